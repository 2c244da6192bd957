"""`aloe-jax serve`: the official `openai` client gets the engine's replies; bad requests get HTTP 400."""

import concurrent.futures
import json
import threading
import urllib.error
import urllib.request

import openai
import pytest

from aloe_jax.sampling.sampler import SamplingParams
from aloe_jax.serving.server import make_server

MODEL = "tiny-test"


@pytest.fixture(scope="module")
def server(tiny_chat_engine):
    srv = make_server(tiny_chat_engine, MODEL, host="127.0.0.1", port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def _client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


def _conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Tell me about topic number {i}" + "!" * (i % 7)}]


def test_replies_equal_the_engine(server, tiny_chat_engine):
    messages = _conversation(3)
    response = _client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    direct = tiny_chat_engine.reply([messages], SamplingParams(max_new_tokens=12))[0]
    assert response.choices[0].message.content == direct.text
    assert response.choices[0].finish_reason == direct.finish_reason
    assert response.usage.prompt_tokens == direct.prompt_tokens
    assert response.usage.completion_tokens == direct.completion_tokens


def test_32_concurrent_requests_all_succeed_and_are_correct(server, tiny_chat_engine):
    client = _client(server)
    convs = [_conversation(i) for i in range(32)]

    def ask(messages):
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(ask, convs))
    direct = tiny_chat_engine.reply(convs, SamplingParams(max_new_tokens=10))
    assert [r.choices[0].message.content for r in responses] == [d.text for d in direct]


def test_n_choices_and_models_listing(server):
    client = _client(server)
    response = client.chat.completions.create(model=MODEL, messages=_conversation(1), max_tokens=6, n=3,
                                              temperature=1.0, seed=5)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [m.id for m in client.models.list().data] == [MODEL]


def _post(base_url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{base_url}/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not valid JSON"),
    (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}).encode(), "not served"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}).encode(),
     "max_tokens"),
    (json.dumps({"model": MODEL, "messages": []}).encode(), "messages"),
    (json.dumps({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}).encode(), "messages[0]"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(),
     "temperature"),
])
def test_bad_requests_get_400_with_openai_error(server, body, fragment):
    status, payload = _post(server, body)
    assert status == 400
    assert fragment in payload["error"]["message"]
    assert payload["error"]["type"] == "invalid_request_error"


def test_server_still_serves_after_bad_requests(server):
    _post(server, b"garbage")
    response = _client(server).chat.completions.create(model=MODEL, messages=_conversation(0), max_tokens=4,
                                                       temperature=0)
    assert response.choices[0].message.content is not None


def test_serve_command_answers_the_openai_client(tmp_path):
    """`aloe-jax serve` as a user starts it (real SmolLM2, loopback, port picked by the OS)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "aloe_jax.cli", "serve", "--port", "0", "--served-name", "smol"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving 'smol' on http://127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
        base_url = line.split(" on ")[1].split(" ")[0]
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
        response = client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16, temperature=0)
        assert "Paris" in response.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _forward_logprobs(engine, prompt: list[int], generated: list[int]) -> list[float]:
    """Log-probability of each generated token under a plain (uncached) forward pass of the whole sequence."""
    import jax
    import jax.numpy as jnp

    ids = prompt + generated
    n = len(ids)
    logits, _ = engine.model(jnp.asarray([ids]), jnp.arange(n)[None], jnp.tril(jnp.ones((n, n), bool))[None])
    logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
    return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(generated)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_equal_a_plain_forward_pass(server, tiny_chat_engine, temperature):
    messages = _conversation(5)
    response = _client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                                       temperature=temperature, seed=3, logprobs=True,
                                                       top_logprobs=5)
    content = response.choices[0].logprobs.content
    direct = tiny_chat_engine.reply([messages], SamplingParams(temperature=temperature, max_new_tokens=6, seed=3,
                                                               top_logprobs=5))[0]
    assert len(content) == len(direct.token_ids) > 0
    expected = _forward_logprobs(tiny_chat_engine, tiny_chat_engine.prompt_ids(messages), list(direct.token_ids))
    for entry, want, token_id in zip(content, expected, direct.token_ids):
        assert abs(entry.logprob - want) <= 1e-4
        assert entry.token == tiny_chat_engine.tokenizer.decode([token_id])
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True) and tops[0] >= entry.logprob - 1e-6
        if temperature == 0:  # greedy picks the most likely token
            assert entry.top_logprobs[0].token == entry.token


def test_logprobs_are_off_unless_asked_and_validated(server):
    client = _client(server)
    plain = client.chat.completions.create(model=MODEL, messages=_conversation(1), max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None
    for bad in ({"logprobs": True, "top_logprobs": 21}, {"top_logprobs": 2}, {"logprobs": "yes"}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=_conversation(1), max_tokens=3, **bad)
