"""The decode scheduler behind `aloe-jax serve`: token-id requests in, token events out, on a background thread.

The HTTP layer (server.py) only talks to the `Scheduler` protocol below: it tokenizes, checks limits, submits one
`Request` per choice and turns the events into JSON or Server-Sent Events. How decoding is batched is the scheduler's
business; `WholeRequestScheduler` runs each gathered batch to completion (a request can wait behind a long one).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Callable, Literal, Protocol, Union

from aloe_jax.sampling.sampler import Sampler, SamplingParams


@dataclasses.dataclass(frozen=True)
class Request:
    """One choice to decode. Its random draws depend only on (params.seed, choice): choice i of a request decodes
    like row i of `Sampler.generate([prompt] * n, params)`, whatever else is in the batch."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    choice: int = 0


@dataclasses.dataclass(frozen=True)
class Tokens:
    """Newly generated tokens of one request (never the stop token). With params.top_logprobs set, per token its
    log-probability and the top alternatives as (token id, log-probability) pairs."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None


@dataclasses.dataclass(frozen=True)
class Finished:
    """The last event of a request. cached_tokens: prompt tokens whose KV came from the prefix cache."""

    finish_reason: Literal["stop", "length", "cancelled", "error"]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    error: str | None = None


Event = Union[Tokens, Finished]


class Handle(Protocol):
    def cancel(self) -> None:
        """Stop decoding this request (its client went away, or a stop string matched); a Finished event with
        finish_reason "cancelled" follows unless it had already finished."""


class Scheduler(Protocol):
    context_length: int  # most tokens (prompt + generated) one request may occupy
    max_batch: int  # most requests decoded at once

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Handle:
        """Queue a request; `on_event` is called from the scheduler's thread, Tokens events then one Finished."""

    def stats(self) -> dict:
        """Numbers for /health: running and queued requests, and whatever the cache reports."""


class _WholeHandle:
    def __init__(self):
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class WholeRequestScheduler:
    """Gathers requests for `window_s`, decodes each group of equal sampling params as one batch to completion, then
    emits each request's tokens as one event. Simple, and unfair: a short request waits behind a long one."""

    def __init__(self, sampler: Sampler, context_length: int, max_batch: int = 64, window_s: float = 0.01):
        self.sampler, self.context_length, self.max_batch, self.window_s = sampler, context_length, max_batch, window_s
        self._queue: queue.Queue = queue.Queue()
        self._running = 0
        threading.Thread(target=self._loop, daemon=True, name="aloe-scheduler").start()

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Handle:
        handle = _WholeHandle()
        self._queue.put((request, on_event, handle))
        return handle

    def stats(self) -> dict:
        return {"running": self._running, "queued": self._queue.qsize()}

    def _loop(self):
        while True:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            groups: dict[tuple, list] = {}
            for item in batch:
                if item[2].cancelled:
                    item[1](Finished("cancelled", len(item[0].prompt_ids), 0))
                    continue
                # Rows of one batch share the seed, and row i draws with key fold_in(seed, i): a group holds at most
                # one request per choice index so that each choice gets its own row index.
                groups.setdefault((item[0].params, item[0].choice), []).append(item)
            for items in groups.values():
                self._run(items)

    def _run(self, items: list) -> None:
        self._running = len(items)
        try:
            for start in range(0, len(items), 1):
                request, on_event, _ = items[start]
                # Pad the batch with copies so the request sits at row `choice` (its key is fold_in(seed, choice)).
                prompts = [list(request.prompt_ids)] * (request.choice + 1)
                generation = self.sampler.generate(prompts, request.params)[request.choice]
                on_event(Tokens(tuple(generation.tokens),
                                None if generation.logprobs is None else tuple(generation.logprobs),
                                None if generation.top_logprobs is None else
                                tuple(tuple(t) for t in generation.top_logprobs)))
                on_event(Finished(generation.finish_reason, generation.prompt_tokens, generation.completion_tokens))
        except Exception as err:  # one failing batch must not kill the server
            for request, on_event, _ in items:
                on_event(Finished("error", len(request.prompt_ids), 0, error=f"{type(err).__name__}: {err}"))
        finally:
            self._running = 0
