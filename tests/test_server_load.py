"""`aloe-jax serve` under load (loopback only, bounded, stops by itself): 64 concurrent clients × 2 requests with mixed
lengths and params, one of them asking for a very long reply — no failures, every reply equal to the same request
served alone, and the long reply does not hold back the short ones; a client that disconnects mid-stream frees its
slot at once; a conversation's next turn reuses its cached prefix."""

import concurrent.futures
import time

import httpx
import openai

from aloe_jax.models.tokenizer import stop_token_ids
from aloe_jax.sampling.sampler import SamplingParams
from aloe_jax.serving.scheduler import ContinuousScheduler
from aloe_jax.serving.server import make_server

MODEL = "tiny-load"
CONTEXT = 256
CLIENTS, PER_CLIENT = 64, 2  # 128 requests per load, 8 per slot: they queue, join and leave
BUDGETS = (4, 8, 12, 16)
LONG = 200


class RecordingScheduler(ContinuousScheduler):
    """The real scheduler, remembering how each request finished."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.finishes: list = []

    def submit(self, request, on_event):
        def record(event):
            if not hasattr(event, "token_ids"):
                self.finishes.append(event)
            on_event(event)
        return super().submit(request, record)


def _serve(engine, max_batch: int):
    scheduler = RecordingScheduler(engine.model, stop_token_ids(engine.tokenizer), context_length=CONTEXT,
                                   max_batch=max_batch, decode_chunk=8)
    server = make_server(scheduler, engine.tokenizer, MODEL, port=0).start()
    return scheduler, server, f"http://127.0.0.1:{server.port}/v1"


def _client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)


def _workload(i: int) -> dict:
    """Request i: one of 16 conversations, a budget of 4–16 tokens, greedy, or sampled with a seed every 8th (no
    top-p: on a random model's flat distribution the nucleus is found by a full sort of the vocabulary at every step,
    which the test does not need to pay for; test_scheduler covers top-p in a mixed batch)."""
    messages = [{"role": "user", "content": f"Question {i % 16}: tell me about " + "the sea " * (i % 16)}]
    kwargs = dict(messages=messages, max_tokens=BUDGETS[i % 4], temperature=0.0)
    if i % 8 == 7:
        kwargs.update(temperature=0.8, seed=i % 16)
    return kwargs


def _expected(engine, kwargs: dict) -> str:
    params = SamplingParams(temperature=kwargs["temperature"], top_p=kwargs.get("top_p", 1.0),
                            max_new_tokens=kwargs["max_tokens"], seed=kwargs.get("seed", 0))
    return engine.reply([kwargs["messages"]], params)[0].text


def _stream(client, kwargs: dict) -> tuple[str, float]:
    """(text, seconds to the first content token) of one streamed request."""
    start, first, parts = time.perf_counter(), None, []
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kwargs):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - start
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts), first if first is not None else time.perf_counter() - start


def _load(client, with_long: bool, per_client: int = PER_CLIENT) -> tuple[dict, list[float]]:
    """Texts of the CLIENTS × per_client requests (by index) and the short requests' times to first token."""
    work = [_workload(i) for i in range(CLIENTS * per_client)]
    if with_long:
        work[0] = dict(messages=[{"role": "user", "content": "Tell me a very long story."}], max_tokens=LONG,
                       temperature=0.0)

    def one_client(c: int):
        return [(c + CLIENTS * k, *_stream(client, work[c + CLIENTS * k])) for k in range(per_client)]

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        done = [r for rs in pool.map(one_client, range(CLIENTS)) for r in rs]
    texts = {i: text for i, text, _ in done}
    ttft = sorted(t for i, _, t in done if not (with_long and i == 0))
    return texts, ttft


def _p(sorted_values: list[float], q: float) -> float:
    return sorted_values[int(q * (len(sorted_values) - 1))]


def test_64_clients_by_2_requests_all_correct_and_a_long_reply_does_not_hold_back_the_rest(tiny_chat_engine):
    scheduler, server, base_url = _serve(tiny_chat_engine, max_batch=16)
    try:
        client = _client(base_url)
        bytes_before = scheduler.stats()["cache_bytes"]
        _load(client, with_long=True, per_client=1)  # warm-up: the program shapes the load needs get compiled
        texts, ttft_alone = _load(client, with_long=False)
        texts_long, ttft_long = _load(client, with_long=True)
        expected = {i: _expected(tiny_chat_engine, _workload(i)) for i in range(16 * 4)}  # workload i is i % 64
        for i in range(CLIENTS * PER_CLIENT):
            assert texts[i] == expected[i % 64], f"request {i}"
            if i:
                assert texts_long[i] == expected[i % 64], f"request {i} beside the long one"
        assert all(f.finish_reason in ("stop", "length") for f in scheduler.finishes)  # 0 failures, 0 cancels
        assert any(f.completion_tokens == LONG for f in scheduler.finishes)
        print(f"\nTTFT of short requests, s: alone p50 {_p(ttft_alone, .5):.3f} p95 {_p(ttft_alone, .95):.3f}; "
              f"beside a {LONG}-token reply p50 {_p(ttft_long, .5):.3f} p95 {_p(ttft_long, .95):.3f}")
        assert _p(ttft_long, .95) <= 2 * _p(ttft_alone, .95)
        assert scheduler.stats()["cache_bytes"] == bytes_before  # allocated once, bounded: slots × context
    finally:
        server.stop()
        scheduler.close()


def test_a_client_gone_mid_stream_frees_its_slot_at_once(tiny_chat_engine):
    scheduler, server, base_url = _serve(tiny_chat_engine, max_batch=1)  # one slot: the next request needs it
    try:
        body = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a very long story."}],
                    max_tokens=LONG, temperature=0.0, stream=True)
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", f"{base_url}/chat/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))
        started = time.perf_counter()
        reply = _client(base_url).chat.completions.create(model=MODEL, max_tokens=4, temperature=0.0,
                                                          messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].message.content == _expected(
            tiny_chat_engine, dict(messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0.0))
        gone = scheduler.finishes[0]
        assert gone.finish_reason == "cancelled" and gone.completion_tokens < LONG
        print(f"\nnext request served {time.perf_counter() - started:.2f} s after the disconnect")
    finally:
        server.stop()
        scheduler.close()


def test_the_next_turn_of_a_conversation_reuses_its_prefix(tiny_chat_engine):
    scheduler, server, base_url = _serve(tiny_chat_engine, max_batch=16)  # the load test's programs
    try:
        client = _client(base_url)
        turn = [{"role": "system", "content": "You are brief. " * 8}, {"role": "user", "content": "Hello there"}]
        first = client.chat.completions.create(model=MODEL, messages=turn, max_tokens=8, temperature=0.0)
        turn += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And then?"}]
        second = client.chat.completions.create(model=MODEL, messages=turn, max_tokens=8, temperature=0.0)
        assert second.usage.prompt_tokens_details.cached_tokens > 0
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert second.choices[0].message.content == _expected(
            tiny_chat_engine, dict(messages=turn, max_tokens=8, temperature=0.0))
    finally:
        server.stop()
        scheduler.close()
