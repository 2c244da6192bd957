"""The continuous-batching scheduler: every request decodes as it would alone, a short request starts while a long
one decodes, a cancelled request frees its slot at once, a conversation's next turn reuses its row, memory is fixed."""

import threading

import numpy as np
import pytest
import torch

from aloe_jax.models.config import read_hf_config
from aloe_jax.models.weights import load_hf_model
from aloe_jax.sampling.sampler import Sampler, SamplingParams
from aloe_jax.serving.scheduler import ContinuousScheduler, Finished, Request, Tokens
from tests import tiny_models

STOP = 7
# Every test but the one-slot one runs 4 slots of 240 tokens: compiled programs of the same shapes serve them all.


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Peaked logits (initializer_range 0.1): greedy has no near-ties."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_models.hf_config("llama3")
    cfg.initializer_range = 0.1
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("scheduler_model")
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return load_hf_model(str(path), read_hf_config(path))


class Collected:
    """Events of one request, with the scheduler's program count at its first token."""

    def __init__(self, scheduler=None):
        self.tokens, self.logprobs, self.finished = [], [], None
        self.done = threading.Event()
        self.first_token_program = None
        self._scheduler = scheduler

    def __call__(self, event):
        if isinstance(event, Tokens):
            if self.first_token_program is None and self._scheduler is not None:
                self.first_token_program = self._scheduler.programs_run
            self.tokens.extend(event.token_ids)
            self.logprobs.extend(event.logprobs or [])
        else:
            assert isinstance(event, Finished) and self.finished is None
            self.finished = event
            self.done.set()

    def wait(self):
        assert self.done.wait(120), "request did not finish"
        return self


def _alone(model, request: Request, stop_ids=(STOP,)):
    """The request served alone by the stateless sampler: choice i is row i of n copies."""
    return Sampler(model, pad_id=0, stop_ids=stop_ids).generate([list(request.prompt_ids)] * (request.choice + 1),
                                                                 request.params)[request.choice]


def test_mixed_requests_each_decode_as_if_served_alone(model):
    scheduler = ContinuousScheduler(model, [STOP], context_length=240, max_batch=4, decode_chunk=4)
    rng = np.random.RandomState(1)
    requests = []
    for i in range(10):
        prompt = tuple(rng.randint(3, 160, rng.randint(2, 40)).tolist())
        params = SamplingParams(temperature=(0.0, 0.7)[i % 2], top_p=(1.0, 0.9, 1.0)[i % 3], seed=i,
                                max_new_tokens=int(rng.randint(1, 24)), top_logprobs=(None, 2)[i % 2])
        requests.append(Request(prompt, params, choice=i % 3))
    collected = [Collected() for _ in requests]
    for request, sink in zip(requests, collected):  # more requests than slots: they queue, join and leave
        scheduler.submit(request, sink)
    finishes = set()
    for request, sink in zip(requests, collected):
        alone = _alone(model, request)
        sink.wait()
        assert sink.tokens == alone.tokens
        assert (sink.finished.finish_reason, sink.finished.completion_tokens) == \
            (alone.finish_reason, alone.completion_tokens)
        assert sink.finished.prompt_tokens == len(request.prompt_ids)
        if alone.logprobs is not None:
            np.testing.assert_allclose(sink.logprobs, alone.logprobs, atol=1e-4)
        finishes.add(alone.finish_reason)
    assert finishes == {"stop", "length"}


def test_a_short_request_starts_within_a_chunk_of_a_long_one(model):
    scheduler = ContinuousScheduler(model, [], context_length=240, max_batch=4, decode_chunk=4)
    long = Collected(scheduler)
    scheduler.submit(Request((5, 6, 7, 8), SamplingParams(max_new_tokens=200)), long)
    while not long.tokens:
        threading.Event().wait(0.01)
    submitted_at = scheduler.programs_run
    short = Collected(scheduler)
    scheduler.submit(Request((9, 10, 11), SamplingParams(max_new_tokens=3)), short)
    short.wait()
    # The chunk running when it arrived, then its own prefill: its first token comes with the second program.
    assert short.first_token_program <= submitted_at + 2
    assert not long.done.is_set(), "the short request should finish while the long one still decodes"
    long.wait()
    assert len(long.tokens) == 200


def test_cancelling_frees_the_slot_for_the_next_request(model):
    scheduler = ContinuousScheduler(model, [], context_length=240, max_batch=1, decode_chunk=4)
    long, waiting = Collected(scheduler), Collected(scheduler)
    handle = scheduler.submit(Request((5, 6, 7, 8), SamplingParams(max_new_tokens=200)), long)
    scheduler.submit(Request((9, 10, 11), SamplingParams(max_new_tokens=3)), waiting)
    while not long.tokens:
        threading.Event().wait(0.01)
    cancelled_at = scheduler.programs_run
    handle.cancel()
    long.wait()
    waiting.wait()
    assert long.finished.finish_reason == "cancelled" and len(long.tokens) < 200
    assert waiting.first_token_program <= cancelled_at + 2
    assert waiting.tokens == _alone(model, Request((9, 10, 11), SamplingParams(max_new_tokens=3)), ()).tokens


def test_the_next_turn_reuses_its_row_and_decodes_as_a_cold_server(model):
    scheduler = ContinuousScheduler(model, [STOP], context_length=240, max_batch=4, decode_chunk=4)
    params = SamplingParams(max_new_tokens=12)
    prompt = tuple(np.random.RandomState(3).randint(8, 160, 30).tolist())
    first = Collected()
    scheduler.submit(Request(prompt, params), first)
    first.wait()
    bytes_before = scheduler.stats()["cache_bytes"]
    turn_two = prompt + tuple(first.tokens) + (STOP, 40, 41, 42)
    second = Collected()
    scheduler.submit(Request(turn_two, params), second)
    second.wait()
    # The row holds the prompt and every generated token but the last (never fed back).
    assert second.finished.cached_tokens == len(prompt) + first.finished.completion_tokens - 1 > 0
    assert second.tokens == _alone(model, Request(turn_two, params)).tokens
    assert scheduler.stats()["cache_bytes"] == bytes_before  # allocated once: rows × context
