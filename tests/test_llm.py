"""Role backends: OpenAIBackend retries against a real (failing on purpose) loopback server, the on-disk call cache
makes reruns free, usage is counted per role, JaxBackend scores options like a plain forward pass."""

import json

import numpy as np
import pytest

from aloe_jax.llm.base import GenerationParams
from aloe_jax.llm.cache import CallCache
from aloe_jax.llm.jax_backend import JaxBackend
from aloe_jax.llm.openai_backend import BackendError, OpenAIBackend
from aloe_jax.llm.roles import Role
from aloe_jax.llm.usage import Price, UsageMeter
from tests.fake_openai import LoopbackOpenAI, completion


class FlakyServer(LoopbackOpenAI):
    """An OpenAI-compatible endpoint that fails the first `failures` requests with `status` — or, given `malformed`
    (content type, body), with a 200 carrying that body — then answers."""

    def __init__(self, failures: int, status: int = 500, malformed: tuple[str, bytes] | None = None):
        self.failures, self.status, self.malformed, self.requests = failures, status, malformed, []
        super().__init__()
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def respond(self, body: dict) -> tuple[int, str, bytes]:
        self.requests.append(body)
        if len(self.requests) > self.failures:
            return 200, "application/json", completion(body["model"], "echo: " + body["messages"][-1]["content"], 7, 3)
        if self.malformed:
            return 200, *self.malformed
        error = {"error": {"message": "try later", "type": "server_error"}}
        return self.status, "application/json", json.dumps(error).encode()


@pytest.fixture
def flaky():
    servers = []

    def make(failures, status=500, malformed=None):
        servers.append(FlakyServer(failures, status, malformed))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


CONV = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize("status", [500, 503, 429])
def test_transient_errors_are_retried(flaky, status):
    server = flaky(failures=2, status=status)
    backend = OpenAIBackend("m", base_url=server.url, max_retries=3)
    [result] = backend.chat([CONV], GenerationParams(max_tokens=5))
    assert result.text == "echo: hello" and len(server.requests) == 3
    assert (result.prompt_tokens, result.completion_tokens) == (7, 3)


def test_persistent_failure_is_one_clear_error(flaky):
    server = flaky(failures=100)
    backend = OpenAIBackend("m", base_url=server.url, max_retries=1)
    with pytest.raises(BackendError, match="HTTP 500"):
        backend.chat([CONV], GenerationParams())
    assert len(server.requests) == 2  # the first try and one retry


_COMPLETION = {"id": "x", "object": "chat.completion", "created": 0, "model": "m"}
MALFORMED_200 = {
    "not JSON": ("application/json", b'{"choices": [{"message": '),
    "plain text": ("text/plain", b"upstream is warming up"),
    "empty choices": ("application/json", json.dumps({**_COMPLETION, "choices": []}).encode()),
    "no choices": ("application/json", json.dumps(_COMPLETION).encode()),
    "choice without a message": ("application/json", json.dumps({**_COMPLETION, "choices": [{"index": 0}]}).encode()),
}


@pytest.mark.parametrize("kind", MALFORMED_200)
def test_a_malformed_200_is_retried_then_one_clear_error(flaky, kind):
    server = flaky(failures=1, malformed=MALFORMED_200[kind])
    [result] = OpenAIBackend("m", base_url=server.url, max_retries=1).chat([CONV], GenerationParams())
    assert result.text == "echo: hello" and len(server.requests) == 2
    server = flaky(failures=100, malformed=MALFORMED_200[kind])
    with pytest.raises(BackendError, match="answered 200 with .*, 2 times"):
        OpenAIBackend("m", base_url=server.url, max_retries=1).chat([CONV], GenerationParams())
    assert len(server.requests) == 2


def test_backend_name_holds_no_key_from_the_url():
    backend = OpenAIBackend("m", base_url="http://user:sk-test-SECRET123@127.0.0.1:9/v1?api_key=sk-test-SECRET123")
    assert backend.name == "openai:m@http://127.0.0.1:9/v1"


def test_client_errors_are_not_retried(flaky):
    server = flaky(failures=100, status=400)
    with pytest.raises(BackendError, match="HTTP 400"):
        OpenAIBackend("m", base_url=server.url, max_retries=3).chat([CONV], GenerationParams())
    assert len(server.requests) == 1


def test_request_carries_the_sampling_params(flaky):
    server = flaky(failures=0)
    OpenAIBackend("m", base_url=server.url).chat([CONV], GenerationParams(temperature=0.3, max_tokens=9, seed=4))
    sent = server.requests[0]
    assert (sent["temperature"], sent["max_tokens"], sent["seed"], sent["messages"]) == (0.3, 9, 4, CONV)


def test_cache_makes_a_rerun_free_and_usage_counts_per_role(flaky, tmp_path):
    server = flaky(failures=0)
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    params = GenerationParams(max_tokens=5)
    meter = UsageMeter(prices={"openai:m@" + server.url: Price(input=1.0, output=2.0)})
    role = Role("judge", OpenAIBackend("m", base_url=server.url), CallCache(str(tmp_path / "c.sqlite")), meter)
    first = role.chat(convs, params)
    assert len(server.requests) == 4 and not any(r.cached for r in first)
    # A new process would open the same file: a fresh cache object sees every call and sends nothing.
    rerun = Role("judge", OpenAIBackend("m", base_url=server.url), CallCache(str(tmp_path / "c.sqlite")), meter)
    second = rerun.chat(convs, params)
    assert len(server.requests) == 4
    assert [r.text for r in second] == [r.text for r in first] and all(r.cached for r in second)
    # Other params are another call.
    rerun.chat(convs[:1], GenerationParams(max_tokens=6))
    assert len(server.requests) == 5
    usage = meter.by_role["judge"]
    assert (usage.calls, usage.cache_hits, usage.prompt_tokens, usage.completion_tokens) == (9, 4, 35, 15)
    assert meter.cost("judge") == pytest.approx((35 * 1.0 + 15 * 2.0) / 1e6)
    assert "judge" in meter.table()


def test_jax_backend_chat_and_scores(tiny_chat_engine, tmp_path):
    backend = JaxBackend(engine=tiny_chat_engine, name="jax:tiny")
    role = Role("user_simulator", backend, CallCache(str(tmp_path / "c.sqlite")), UsageMeter())
    convs = [[{"role": "user", "content": "hi there"}], [{"role": "user", "content": "a longer question here?"}]]
    replies = role.chat(convs, GenerationParams(max_tokens=6))
    assert all(r.completion_tokens <= 6 for r in replies)
    options = ["1", "2", "3", "4", "5"]
    scores = role.score_options(convs, options)
    assert scores.shape == (2, 5) and np.all(scores < 0)
    np.testing.assert_allclose(role.score_options(convs, options), scores)  # second time from the cache
    np.testing.assert_allclose(tiny_chat_engine.score_options(convs, options), scores, atol=1e-5)
