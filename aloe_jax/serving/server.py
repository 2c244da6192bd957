"""`aloe-jax serve`: an OpenAI-compatible HTTP API on FastAPI + uvicorn over a decode `Scheduler`, so a checkpoint can
play the user simulator or judge for any OpenAI client.

The HTTP layer validates (schema.py), tokenizes, checks the context window before any work, submits one scheduler
`Request` per choice and turns the scheduler's token events into JSON or Server-Sent Events. Text is detokenized
incrementally (`TextAssembler`), so a streamed reply and a whole one are the same string. Every bad input gets a 4xx
OpenAI-style error body, `{"error": {"message", "type", "param", "code"}}`, and the server keeps answering; requests
whose client went away, or that matched a stop string, are cancelled on the scheduler so they free their slot.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from typing import AsyncIterator, Callable

import pydantic
import uvicorn
from fastapi import APIRouter, Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from uvicorn.protocols.http.h11_impl import H11Protocol

from aloe_jax.models.tokenizer import encode_chat_prompt
from aloe_jax.sampling.sampler import SamplingParams
from aloe_jax.serving.schema import ChatCompletionRequest, CompletionRequest
from aloe_jax.serving.scheduler import Finished, Request, Scheduler, Tokens

DEFAULT_MAX_TOKENS = 256  # reply budget when a request names none (capped to what fits the context window)
# A body may hold this many bytes per token of context plus a fixed slack: escaped non-Latin text takes up to ~12
# bytes a token, and the slack covers the JSON around the messages. Larger bodies get 413 before they are read.
BODY_BYTES_PER_TOKEN = 16
BODY_SLACK_BYTES = 64 * 2**10
REQUEST_TOKENS_PER_CONTEXT = 4  # n × (prompt + max_tokens) may reach this many context windows

access_log = logging.getLogger("aloe_jax.serving.access")


class ApiError(Exception):
    """A client mistake (or a failure to report): an HTTP status with an OpenAI-style JSON error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        """OpenAI's error object."""
        kind = ("invalid_request_error" if self.status < 500 and self.status != 401
                else "authentication_error" if self.status == 401 else "server_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


def _error_response(err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _validation_error(err: pydantic.ValidationError | RequestValidationError) -> ApiError:
    first = err.errors()[0]
    if first["type"] == "json_invalid":
        return ApiError(400, f"request body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}")
    loc = [part for part in first["loc"] if part != "body"]
    # ("messages", 0, "role") → messages[0].role; union members (str, list[...]) are pydantic's, not the client's.
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc
                   if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool")))).lstrip(".")
    message = first["msg"].removeprefix("Value error, ")
    return ApiError(400, f"{path}: {message}" if path else message, param=str(loc[0]) if loc else None)


class TextAssembler:
    """The text of one choice as its tokens arrive: the decoded ids (special tokens skipped), stripped of leading and
    trailing whitespace when `strip` (as the chat engine's replies are), cut before the first stop string. `add`
    returns only new text that no later token can change: a trailing incomplete UTF-8 character (decoded as U+FFFD),
    trailing whitespace under `strip`, and a tail that could begin a stop string are held back."""

    def __init__(self, tokenizer, stops: list[str], strip: bool):
        self.tokenizer, self.stops, self.strip = tokenizer, stops, strip
        self.ids: list[int] = []
        self.text = ""  # what has been handed out
        self.stopped = False  # a stop string matched: the text is final

    def add(self, token_ids) -> str:
        """The new settled text after `token_ids`."""
        if self.stopped:
            return ""
        self.ids += token_ids
        text = self._decoded()
        cuts = [text.find(s) for s in self.stops if s in text]
        if cuts:
            self.stopped = True
            return self._hand_out(text[: min(cuts)])
        end = len(text.rstrip("\ufffd"))
        if self.strip:
            end = len(text[:end].rstrip())
        held = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._hand_out(text[: min(end, len(text) - held)])

    def finish(self) -> str:
        """The rest of the text once the choice has finished."""
        if self.stopped:
            return ""
        text = self._decoded()
        return self._hand_out(text.rstrip() if self.strip else text)

    def _decoded(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return text.lstrip() if self.strip else text

    def _hand_out(self, settled: str) -> str:
        # Decoding more ids extends the text of fewer (held-back tails aside), so `settled` starts with what was
        # handed out; a tokenizer that rewrote earlier text would only lose that rewrite, never repeat text.
        if len(settled) <= len(self.text) or not settled.startswith(self.text):
            return ""
        delta, self.text = settled[len(self.text):], settled
        return delta


class _Run:
    """The choices of one request on the scheduler: their events, moved from the scheduler's thread onto the event
    loop as (choice, event) pairs, and their handles."""

    def __init__(self, scheduler: Scheduler, requests: list[Request]):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()

        def deliver(choice: int) -> Callable:
            def on_event(event):
                try:
                    loop.call_soon_threadsafe(self.events.put_nowait, (choice, event))
                except RuntimeError:  # the loop has closed (server shutting down): nobody is waiting
                    pass
            return on_event

        self.handles = [scheduler.submit(r, deliver(i)) for i, r in enumerate(requests)]
        self.open = set(range(len(requests)))  # choices without their Finished event yet
        self.cancelled: set[int] = set()

    def cancel(self, choice: int) -> None:
        """Cancel one choice on the scheduler (once)."""
        if choice not in self.cancelled:
            self.cancelled.add(choice)
            self.handles[choice].cancel()

    def cancel_open(self) -> None:
        """Cancel every choice that has not finished."""
        for choice in list(self.open):
            self.cancel(choice)


def _token_entry(tokenizer, token_id: int, logprob: float) -> dict:
    text = tokenizer.decode([token_id])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _logprob_entries(tokenizer, event: Tokens) -> list[dict] | None:
    """OpenAI's `logprobs.content` entries for the tokens of one event (None when not asked for)."""
    if event.logprobs is None:
        return None
    return [{**_token_entry(tokenizer, t, lp), "top_logprobs": [_token_entry(tokenizer, a, alp) for a, alp in alts]}
            for t, lp, alts in zip(event.token_ids, event.logprobs, event.top_logprobs)]


async def _cancel_on_disconnect(request: HttpRequest, run: _Run) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    run.cancel_open()


async def _outputs(run: _Run, assemblers: list[TextAssembler], tokenizer, deadline: float) -> AsyncIterator[tuple]:
    """(choice, new text, logprob entries or None, Finished or None) as the scheduler's events arrive, until every
    choice has finished; a stop string cancels its choice and makes its finish_reason "stop"."""
    while run.open:
        try:
            choice, event = await asyncio.wait_for(run.events.get(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise ApiError(504, "the request took longer than the server's request timeout", code="timeout") from None
        assembler = assemblers[choice]
        if isinstance(event, Tokens):
            if assembler.stopped:  # tokens decoded before the cancel took effect
                continue
            delta = assembler.add(list(event.token_ids))
            if assembler.stopped:
                run.cancel(choice)
            yield choice, delta, _logprob_entries(tokenizer, event), None
        elif isinstance(event, Finished):
            run.open.discard(choice)
            if event.finish_reason == "error":
                raise ApiError(500, f"generation failed: {event.error}")
            reason = "stop" if assembler.stopped else event.finish_reason
            yield choice, assembler.finish(), None, Finished(reason, event.prompt_tokens, event.completion_tokens,
                                                            event.cached_tokens)


def _usage(finished: list[Finished]) -> dict:
    prompt = max(f.prompt_tokens for f in finished)
    completion = sum(f.completion_tokens for f in finished)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": max(f.cached_tokens for f in finished)}}


def _sse(payload) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


class _AccessLog:
    """ASGI middleware: one log line per request — method, path, status, tokens, milliseconds; never the body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), [0]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            usage = scope.get("state", {}).get("usage")
            tokens = f" prompt={usage['prompt_tokens']} completion={usage['completion_tokens']}" if usage else ""
            access_log.info("%s %s %s%s %.0fms", scope["method"], scope["path"], status[0] or "-", tokens,
                            (time.monotonic() - start) * 1000)


def make_app(scheduler: Scheduler, tokenizer, model_name: str, *, api_key: str | None = None,
             request_timeout_s: float = 600.0, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> FastAPI:
    """The ASGI app serving `model_name` from `scheduler`; with `api_key`, /v1 routes need `Authorization: Bearer`."""
    context = scheduler.context_length
    max_body = BODY_BYTES_PER_TOKEN * context + BODY_SLACK_BYTES
    app = FastAPI(title="aloe-jax", openapi_url=None, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        return _error_response(_validation_error(err))

    @app.exception_handler(HTTPException)
    async def _http_error(request, err: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        message = f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else err.detail
        return _error_response(ApiError(err.status_code, message, code=code))

    @app.exception_handler(Exception)
    async def _crash(request, err: Exception):
        return _error_response(ApiError(500, f"internal error: {type(err).__name__}: {err}"))

    def authorize(request: HttpRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_body(request: HttpRequest) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and int(declared) > max_body:  # h11 has checked that it is a number
            raise ApiError(413, f"request body of {declared} bytes is over this server's cap of {max_body} bytes "
                                f"({BODY_BYTES_PER_TOKEN} per token of its {context}-token context, plus slack)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise ApiError(413, f"request body is over this server's cap of {max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def parse(request: HttpRequest, schema: type[pydantic.BaseModel], deadline: float):
        try:
            body = await asyncio.wait_for(read_body(request), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise ApiError(408, "the request body did not arrive within the request timeout", code="timeout") from None
        try:
            parsed = schema.model_validate_json(body)
        except pydantic.ValidationError as err:
            raise _validation_error(err) from None
        if parsed.model != model_name:
            raise ApiError(404, f"model {parsed.model!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return parsed

    def sampling(body, prompt_ids: list[int], top_logprobs: int | None) -> SamplingParams:
        room = context - len(prompt_ids)
        asked = body.reply_budget()
        if room < 1 or (asked is not None and asked > room):
            raise ApiError(400, f"this model's maximum context length is {context} tokens; the prompt has "
                                f"{len(prompt_ids)} tokens and the reply asks for {asked or 1} more",
                           param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        max_tokens = asked if asked is not None else min(default_max_tokens, room)
        if body.n * (len(prompt_ids) + max_tokens) > REQUEST_TOKENS_PER_CONTEXT * context:
            raise ApiError(400, f"n × (prompt + max_tokens) = {body.n} × {len(prompt_ids) + max_tokens} tokens is "
                                f"over this server's cap of {REQUEST_TOKENS_PER_CONTEXT * context} tokens per request",
                           param="n", code="request_too_large")
        return SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, max_new_tokens=max_tokens,
                              seed=body.seed or 0, top_logprobs=top_logprobs)

    async def respond(request: HttpRequest, body, prompt_ids: list[int], params: SamplingParams, chat: bool,
                      deadline: float):
        run = _Run(scheduler, [Request(tuple(prompt_ids), params, choice=i) for i in range(body.n)])
        assemblers = [TextAssembler(tokenizer, body.stop_strings(), strip=chat) for _ in range(body.n)]
        outputs = _outputs(run, assemblers, tokenizer, deadline)
        created, reply_id = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": reply_id, "created": created, "model": model_name}
        if body.stream:
            return StreamingResponse(stream(request, run, outputs, head, body, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(_cancel_on_disconnect(request, run))
        texts, logprobs, finished = [""] * body.n, [[] for _ in range(body.n)], [None] * body.n
        try:
            async for choice, delta, entries, done in outputs:
                texts[choice] += delta
                logprobs[choice] += entries or []
                finished[choice] = done or finished[choice]
        finally:
            watcher.cancel()
            run.cancel_open()
        usage = _usage(finished)
        request.state.usage = usage
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "logprobs": {"content": logprobs[i]} if params.top_logprobs is not None else None,
                        "finish_reason": finished[i].finish_reason} for i in range(body.n)]
        else:
            choices = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": finished[i].finish_reason}
                       for i in range(body.n)]
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": usage}

    async def stream(request: HttpRequest, run: _Run, outputs, head: dict, body, chat: bool):
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        chunk_head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(choice: int, text: str | None, entries, reason) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
                part = {"index": choice, "delta": delta,
                        "logprobs": None if entries is None else {"content": entries}, "finish_reason": reason}
            else:
                part = {"index": choice, "text": text or "", "logprobs": None, "finish_reason": reason}
            return _sse({**chunk_head, "choices": [part], **({"usage": None} if include_usage else {})})

        watcher = asyncio.create_task(_cancel_on_disconnect(request, run))
        finished = []
        try:
            if chat:
                for i in range(body.n):
                    yield chunk(i, None, None, None)
            async for choice, delta, entries, done in outputs:
                if delta or entries:
                    yield chunk(choice, delta, entries, None)
                if done is not None:
                    finished.append(done)
                    yield chunk(choice, "", None, done.finish_reason)
            request.state.usage = _usage(finished)
            if include_usage:
                yield _sse({**chunk_head, "choices": [], "usage": request.state.usage})
        except ApiError as err:  # the status line is sent already: the error goes into the stream
            yield _sse(err.body())
        finally:
            watcher.cancel()
            run.cancel_open()
        yield _sse("[DONE]")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.post("/chat/completions")
    async def chat_completions(request: HttpRequest):
        deadline = time.monotonic() + request_timeout_s
        body = await parse(request, ChatCompletionRequest, deadline)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        prompt_ids = await run_in_threadpool(encode_chat_prompt, tokenizer, messages)
        params = sampling(body, prompt_ids, (body.top_logprobs or 0) if body.logprobs else None)
        return await respond(request, body, prompt_ids, params, chat=True, deadline=deadline)

    @v1.post("/completions")
    async def completions(request: HttpRequest):
        deadline = time.monotonic() + request_timeout_s
        body = await parse(request, CompletionRequest, deadline)
        prompt_ids = await run_in_threadpool(tokenizer.encode, body.prompt)
        params = sampling(body, prompt_ids, None)
        return await respond(request, body, prompt_ids, params, chat=False, deadline=deadline)

    model_card = {"id": model_name, "object": "model", "created": 0, "owned_by": "aloe-jax"}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise ApiError(404, f"model {model_id!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return model_card

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "context_length": context, "max_batch": scheduler.max_batch,
                "scheduler": scheduler.stats()}

    app.include_router(v1)
    app.add_middleware(_AccessLog)
    return app


class _JsonErrorsH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, but an unparsable request (a `Content-Length: abc`, a broken request line) gets
    OpenAI's JSON error body instead of plain text, and a connection that sends nothing is closed after the
    keep-alive timeout instead of being held forever."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def send_400_response(self, msg: str) -> None:
        import h11

        body = json.dumps(ApiError(400, f"malformed HTTP request: {msg}").body()).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class Server:
    """An app on a socket bound at construction (port 0: a free one, see `.port`), served by uvicorn in the
    foreground (`serve_forever`) or on a thread (`start` / `stop`)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 8000, *, limit_concurrency: int = 1024,
                 timeout_keep_alive: float = 5.0, backlog: int = 2048, log_level: str = "warning"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=backlog)
        self.host, self.port = host, self.socket.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, access_log=False, http=_JsonErrorsH11, lifespan="off",
                                limit_concurrency=limit_concurrency, timeout_keep_alive=timeout_keep_alive,
                                backlog=backlog)
        self.uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        """Serve in this thread until SIGINT / SIGTERM."""
        self.uvicorn.run(sockets=[self.socket])

    def start(self, timeout_s: float = 30.0) -> "Server":
        """Serve on a background thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.socket]}, daemon=True,
                                        name="aloe-serve")
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.socket.close()


def make_server(scheduler: Scheduler, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000, *,
                api_key: str | None = None, log_level: str = "warning", request_timeout_s: float = 600.0) -> Server:
    """A `Server` (not yet serving) of `model_name` from `scheduler`; port 0 picks a free port."""
    app = make_app(scheduler, tokenizer, model_name, api_key=api_key, request_timeout_s=request_timeout_s)
    return Server(app, host, port, limit_concurrency=max(256, 4 * scheduler.max_batch), log_level=log_level)
