"""The decode scheduler behind `aloe-jax serve`: token-id requests in, token events out, on a background thread.

The HTTP layer (server.py) only talks to the `Scheduler` protocol below: it tokenizes, checks limits, submits one
`Request` per choice and turns the events into JSON or Server-Sent Events. How decoding is batched is the scheduler's
business: `ContinuousScheduler` lets requests join and leave the running batch between decode chunks.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Callable, Literal, Protocol, Union

from aloe_jax.sampling.sampler import SamplingParams


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


class _Slot:
    """A running request in its pool row."""

    def __init__(self, request: Request, on_event: Callable[[Event], None], handle: "_ContinuousHandle"):
        self.request, self.on_event, self.handle = request, on_event, handle
        self.generated = 0
        self.cached = 0


class _ContinuousHandle:
    def __init__(self, wake: Callable[[], None]):
        self.cancelled = False
        self._wake = wake

    def cancel(self) -> None:
        self.cancelled = True
        self._wake()


class ContinuousScheduler:
    """Continuous batching over a `SessionPool` whose rows are request slots: requests join the running decode batch
    between chunks of `decode_chunk` steps and leave it when they finish or are cancelled, each with its own sampling
    params, seed and length. A waiting request starts within one chunk when a slot is free.

    Finished rows keep their tokens: a new request goes to the free row holding its longest prefix (the previous turn
    of the same conversation), prefills only the rest and reports those tokens as cached. Memory is fixed up front:
    `max_batch` rows × (`context_length` + 1) slots.
    """

    def __init__(self, model, stop_ids, context_length: int, max_batch: int = 16, decode_chunk: int = 8,
                 kv_dtype: str | None = None):
        from aloe_jax.sampling.sessions import SessionPool

        self.context_length, self.max_batch, self.decode_chunk = context_length, max_batch, decode_chunk
        self.pool = SessionPool(model, max_batch, stop_ids, kv_dtype)
        self.pool._ensure(context_length + 1)
        self.vocab_size = model.cfg.vocab_size
        self._queue: queue.Queue = queue.Queue()
        self._waiting: list[tuple[Request, Callable, _ContinuousHandle]] = []
        self._slots: list[_Slot | None] = [None] * max_batch
        self._last_used = [0.0] * max_batch
        self._reset_state()
        self.programs_run = 0
        self._closing = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name="aloe-scheduler")
        self._thread.start()

    def _reset_state(self):
        import numpy as np

        rows = self.max_batch
        self._token, self._slot, self._gen, self._budget = (np.zeros(rows, np.int32) for _ in range(4))
        self._live = np.zeros(rows, bool)
        self._temperature, self._top_p = np.zeros(rows, np.float32), np.ones(rows, np.float32)
        self._seed, self._choice = np.zeros(rows, np.uint32), np.zeros(rows, np.int32)

    def close(self) -> None:
        """Stop the scheduler's thread once what is running has finished or been cancelled by its clients."""
        self._closing = True
        self._queue.put(None)
        self._thread.join(timeout=60)

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Handle:
        handle = _ContinuousHandle(lambda: self._queue.put(None))
        self._queue.put((request, on_event, handle))
        return handle

    def stats(self) -> dict:
        from aloe_jax.sampling.sessions import cache_bytes_per_token

        return {"running": sum(s is not None for s in self._slots), "queued": len(self._waiting) + self._queue.qsize(),
                "slots": self.max_batch, "context_length": self.context_length,
                "cache_bytes": self.pool.rows * self.pool.capacity * cache_bytes_per_token(self.pool.model,
                                                                                           self.pool.kv_dtype),
                "prefilled_tokens": self.pool.prefilled_tokens, "cached_tokens": self.pool.reused_tokens}

    # --- the loop ---------------------------------------------------------------------------------------------------
    def _loop(self):
        while True:
            idle = not self._waiting and not self._live.any()
            if idle and self._closing:
                return
            self._take_submissions(block=idle)
            try:
                self._drop_cancelled()
                self._admit()
                if self._live.any():
                    self._decode_chunk()
            except Exception as err:  # a failing step must not kill the server: fail what was running
                message = f"{type(err).__name__}: {err}"
                for row, slot in enumerate(self._slots):
                    if slot is not None:
                        self._finish(row, "error", error=message)
                    self.pool.drop(row)
                self._reset_state()

    def _take_submissions(self, block: bool) -> None:
        while True:
            try:
                item = self._queue.get(block=block)
            except queue.Empty:
                return
            block = False
            if item is not None:
                self._waiting.append(item)

    def _finish(self, row: int, reason: str, error: str | None = None) -> None:
        slot = self._slots[row]
        self._slots[row] = None
        self._live[row] = False
        self._last_used[row] = time.monotonic()
        slot.on_event(Finished(reason, len(slot.request.prompt_ids), slot.generated, slot.cached, error))

    def _drop_cancelled(self) -> None:
        for item in [w for w in self._waiting if w[2].cancelled]:
            self._waiting.remove(item)
            item[1](Finished("cancelled", len(item[0].prompt_ids), 0))
        for row, slot in enumerate(self._slots):
            if slot is not None and slot.handle.cancelled:
                self._finish(row, "cancelled")

    def _free_row_for(self, prompt: tuple[int, ...], taken: set[int]) -> int | None:
        """The free row holding the longest prefix of `prompt`, else the least recently used free row."""
        from aloe_jax.sampling.sessions import common_prefix

        free = [r for r in range(self.max_batch) if self._slots[r] is None and r not in taken]
        if not free:
            return None
        return max(free, key=lambda r: (common_prefix(self.pool._tokens[r], prompt), -self._last_used[r]))

    def _admit(self) -> None:
        """Prefill waiting requests into free rows (one program for all of them) and emit their first tokens."""
        admitted: list[tuple[int, tuple]] = []
        taken: set[int] = set()
        while self._waiting:
            row = self._free_row_for(self._waiting[0][0].prompt_ids, taken)
            if row is None:
                break
            taken.add(row)
            admitted.append((row, self._waiting.pop(0)))
        if not admitted:
            return
        import numpy as np

        rows = [row for row, _ in admitted]
        requests = [item[0] for _, item in admitted]
        for row, (request, on_event, handle) in admitted:
            self._slots[row] = _Slot(request, on_event, handle)
        params = [r.params for r in requests]
        cached, picked = self.pool.prefill(rows, [list(r.prompt_ids) for r in requests], params,
                                           [r.choice for r in requests], [p.max_new_tokens for p in params],
                                           mode=self._mode(params), pad_rows=True)
        self.programs_run += 1
        tokens = np.asarray(picked.token)
        logprobs = None if picked.logprobs is None else [np.asarray(x) for x in picked.logprobs]
        for i, (row, request) in enumerate(zip(rows, requests)):
            slot = self._slots[row]
            slot.cached = cached[i]
            params = request.params
            self._temperature[row], self._top_p[row] = params.temperature, params.top_p
            self._seed[row], self._choice[row] = params.seed, request.choice
            self._slot[row] = len(request.prompt_ids)
            self._gen[row] = 0
            if params.max_new_tokens == 0:
                self._finish(row, "length")
                continue
            self._emit(row, [int(tokens[i])], None if logprobs is None else [x[i:i + 1] for x in logprobs])
            self._token[row] = tokens[i]
            self._budget[row] = params.max_new_tokens - 1
            self._live[row] = True
            self._end_if_done(row, int(tokens[i]))

    def _mode(self, params: list[SamplingParams]):
        """The compiled sampling mode for these requests; any number of log-prob alternatives asked for is served by
        one variant (the most there may be), so a mix of requests compiles at most 2 × 2 × 2 modes."""
        from aloe_jax.sampling.sampler import MAX_TOP_LOGPROBS
        from aloe_jax.sampling.sessions import sampling_mode

        mode = sampling_mode(params, self.vocab_size)
        return mode._replace(logprobs=min(MAX_TOP_LOGPROBS, self.vocab_size)) if mode.logprobs >= 0 else mode

    def _emit(self, row: int, tokens: list[int], logprobs) -> None:
        """Tokens event for a row's new tokens (the stop token is counted, not sent)."""
        slot = self._slots[row]
        slot.generated += len(tokens)
        stop_ids = set(self.pool.stop_ids.tolist())
        kept = tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens
        if not kept:
            return
        event_lp = top = None
        wanted = slot.request.params.top_logprobs
        if wanted is not None and logprobs is not None:
            chosen, ids, values = logprobs
            event_lp = tuple(float(x) for x in chosen[:len(kept)])
            top = tuple(tuple(zip(map(int, ids[j][:wanted]), map(float, values[j][:wanted])))
                        for j in range(len(kept)))
        slot.on_event(Tokens(tuple(kept), event_lp, top))

    def _end_if_done(self, row: int, last_token: int) -> None:
        if last_token in set(self.pool.stop_ids.tolist()):
            self._finish(row, "stop")
        elif self._budget[row] <= 0:
            self._finish(row, "length")

    def _decode_chunk(self) -> None:
        """One chunk of decode steps for the live rows only (padded to a power of two with idle rows: few compiled
        shapes), so a lone request does not pay for every slot."""
        import jax
        import numpy as np

        from aloe_jax.sampling.sessions import DecodeState, RowSampling

        live_rows = [r for r in range(self.max_batch) if self._live[r]]
        mode = self._mode([self._slots[r].request.params for r in live_rows])
        target = min(max(1 << (len(live_rows) - 1).bit_length(), 2), self.max_batch)
        idle = [r for r in range(self.max_batch) if not self._live[r]]
        rows = np.asarray(live_rows + idle[:target - len(live_rows)], np.int32)
        for r in idle:  # rows not live must not advance: their slot stays past what they hold
            self._slot[r] = len(self.pool._tokens[r])
        pick = lambda a: a[rows]  # noqa: E731
        state = DecodeState(*map(pick, (self._token, self._slot, self._gen, self._budget, self._live)))
        sampling = RowSampling(*map(pick, (self._temperature, self._top_p, self._seed, self._choice)))
        state, out = self.pool.decode(state, sampling, mode, self.decode_chunk, rows=rows.tolist())
        self.programs_run += 1
        before = self._token.copy()
        for name, value in zip(("_token", "_slot", "_gen", "_budget"), jax.device_get(state[:4])):
            getattr(self, name)[rows] = value
        new, counts = jax.device_get((out.tokens, out.count))
        logprobs = None if out.logprobs is None else jax.device_get(out.logprobs)
        for i, row in enumerate(live_rows):
            n = int(counts[i])
            if n == 0:
                continue
            picked = new[i, :n].tolist()
            self.pool.note_decoded(row, [int(before[row])] + picked[:-1])
            self._emit(row, picked, None if logprobs is None else [x[i, :n] for x in logprobs])
            if self._slots[row] is not None:
                self._end_if_done(row, picked[-1])
