"""`aloe-jax serve`: an OpenAI-compatible HTTP API (`POST /v1/chat/completions`, `GET /v1/models`) over the JAX chat
engine, so a checkpoint can play the user simulator or judge for any OpenAI client.

Concurrent requests are gathered for a few milliseconds and decoded as one batch: the batched sampler's cost per step
hardly grows with batch size, so this is where the throughput comes from. Bad requests get HTTP 400 with an
OpenAI-style error body; the server itself never dies on one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import http.server
import json
import queue
import threading
import time
import uuid
from typing import Any

from aloe_jax.sampling.sampler import MAX_TOP_LOGPROBS, SamplingParams

MAX_N = 16
MAX_BODY_BYTES = 8 * 2**20


class RequestError(Exception):
    """A client mistake: becomes HTTP 400 (or the given status) with an OpenAI-style JSON error."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclasses.dataclass
class _Pending:
    conversations: list[list[dict]]
    params: SamplingParams
    future: concurrent.futures.Future


def _number(body: dict, key: str, default, lo=None, hi=None, integer=False):
    value = body.get(key, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise RequestError(f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise RequestError(f"'{key}' must be between {lo} and {hi}, got {value!r}", key)
    return value


def parse_chat_request(body: Any, served_model: str) -> tuple[list[dict], SamplingParams, int, list[str]]:
    """(messages, sampling params, n, stop strings) from a request body; raises RequestError on anything invalid."""
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    model = body.get("model")
    if model != served_model:
        raise RequestError(f"model {model!r} is not served here; this server serves {served_model!r}", "model",
                           code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise RequestError(f"messages[{i}] must be {{'role': system|user|assistant, 'content': string}}",
                               "messages")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a string or a list of at most 4 non-empty strings", "stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    want_logprobs = body.get("logprobs") or False
    if not isinstance(want_logprobs, bool):
        raise RequestError(f"'logprobs' must be a boolean, got {want_logprobs!r}", "logprobs")
    top_logprobs = _number(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    if top_logprobs is not None and not want_logprobs:
        raise RequestError("'top_logprobs' requires 'logprobs': true", "top_logprobs")
    params = SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        max_new_tokens=_number({"max_tokens": max_tokens}, "max_tokens", 256, 1, 1 << 20, integer=True),
        seed=_number(body, "seed", 0, 0, 2**32 - 1, integer=True),
        top_logprobs=(top_logprobs or 0) if want_logprobs else None,
    )
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    if body.get("stream"):
        raise RequestError("streaming is not supported; set stream to false", "stream")
    return [{"role": m["role"], "content": m["content"]} for m in messages], params, n, stop


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class Batcher:
    """Collects pending requests for up to `window_s` and runs them through the engine as one batch per params."""

    def __init__(self, engine, max_batch: int = 64, window_s: float = 0.01):
        self.engine, self.max_batch, self.window_s = engine, max_batch, window_s
        self.queue: queue.Queue[_Pending] = queue.Queue()
        threading.Thread(target=self._loop, daemon=True, name="aloe-batcher").start()

    def submit(self, conversations: list[list[dict]], params: SamplingParams):
        """A future resolving to one ChatReply per conversation."""
        pending = _Pending(conversations, params, concurrent.futures.Future())
        self.queue.put(pending)
        return pending.future

    def _loop(self):
        while True:
            batch = [self.queue.get()]
            deadline = time.monotonic() + self.window_s
            rows = len(batch[0].conversations)
            while rows < self.max_batch:
                try:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                batch.append(item)
                rows += len(item.conversations)
            groups: dict[str, list[_Pending]] = {}
            for item in batch:
                groups.setdefault(repr(item.params), []).append(item)
            for items in groups.values():
                self._run(items)

    def _run(self, items: list[_Pending]):
        conversations = [c for item in items for c in item.conversations]
        try:
            replies = self.engine.reply(conversations, items[0].params)
        except Exception as err:  # one failing batch must not kill the server
            for item in items:
                item.future.set_exception(err)
            return
        start = 0
        for item in items:
            item.future.set_result(replies[start: start + len(item.conversations)])
            start += len(item.conversations)


def _token_entry(tokenizer, token_id: int, logprob: float) -> dict:
    text = tokenizer.decode([token_id])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _logprobs_json(tokenizer, reply) -> dict | None:
    """OpenAI's `choices[i].logprobs` for a reply decoded with top_logprobs set (None otherwise)."""
    if reply.logprobs is None:
        return None
    content = []
    for token_id, logprob, alternatives in zip(reply.token_ids, reply.logprobs, reply.top_logprobs):
        entry = _token_entry(tokenizer, token_id, logprob)
        entry["top_logprobs"] = [_token_entry(tokenizer, t, lp) for t, lp in alternatives]
        content.append(entry)
    return {"content": content}


def _completion_json(model: str, replies, stop: list[str], tokenizer=None) -> dict:
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for i, reply in enumerate(replies):
        text, stopped = _cut_at_stop(reply.text, stop)
        choices.append({"index": i, "message": {"role": "assistant", "content": text},
                        "logprobs": _logprobs_json(tokenizer, reply),
                        "finish_reason": "stop" if stopped else reply.finish_reason})
        prompt_tokens = reply.prompt_tokens
        completion_tokens += reply.completion_tokens
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
        "model": model, "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def make_handler(model_name: str, batcher: Batcher):
    """The request handler class for one served model."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet: one line per request is noise at 32 concurrent clients
            pass

        def _send(self, status: int, payload: dict):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, param=None, code=None):
            kind = "invalid_request_error" if status < 500 else "server_error"
            self._send(status, {"error": {"message": message, "type": kind, "param": param, "code": code}})

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [
                    {"id": model_name, "object": "model", "created": 0, "owned_by": "aloe-jax"}]})
            else:
                self._error(404, f"no route GET {self.path}")

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._error(404, f"no route POST {self.path}")
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    raise RequestError(f"request body over {MAX_BODY_BYTES} bytes")
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise RequestError(f"request body is not valid JSON: {err}") from None
                messages, params, n, stop = parse_chat_request(body, model_name)
            except RequestError as err:
                self._error(err.status, str(err), err.param, err.code)
                return
            try:
                replies = batcher.submit([messages] * n, params).result()
            except Exception as err:
                self._error(500, f"generation failed: {type(err).__name__}: {err}")
                return
            self._send(200, _completion_json(model_name, replies, stop, batcher.engine.tokenizer))

    return Handler


def make_server(engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 64):
    """A ThreadingHTTPServer (not yet serving) for `engine`; port 0 picks a free port."""
    server = http.server.ThreadingHTTPServer((host, port), make_handler(model_name, Batcher(engine, max_batch)))
    server.daemon_threads = True
    return server
