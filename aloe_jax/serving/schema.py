"""The request bodies `aloe-jax serve` accepts, as pydantic models of OpenAI's schema.

Validation is strict and closed: a wrong type ("0.5" for a number), a non-finite number, an unknown field or a
parameter this server does not implement (penalties, logit_bias, tools, JSON mode) fails validation, and the server
answers 400 naming the field — a parameter is never silently ignored. Response bodies are built in server.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import pydantic

from aloe_jax.sampling.sampler import MAX_TOP_LOGPROBS

MAX_N = 16  # most choices per request
MAX_STOP = 4  # most stop strings, as OpenAI


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    """One part of a list-form message content; only text parts are served."""

    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        """The content as one string (list-form parts joined, as OpenAI does)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    @pydantic.field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") != "text":
                    raise ValueError(f"content part of type {part.get('type')!r} is not supported: this server "
                                     "serves a text model (only {'type': 'text', 'text': ...} parts)")
        return content


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text"]  # json_object / json_schema are not implemented


def _unsupported(value, info, absent=(None,)):
    """`value` when it is one of `absent`, else the 400 naming the field."""
    if value not in absent:
        raise ValueError(f"{info.field_name} is not supported by this server; leave it out")
    return value


Temperature = Annotated[float, pydantic.Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, pydantic.Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Seed = Annotated[int, pydantic.Field(ge=0, lt=2**32)]


class _Sampling(_Strict):
    """The fields both completion endpoints share."""

    model: str
    n: int = pydantic.Field(1, ge=1, le=MAX_N)
    temperature: Temperature | None = None  # None: 1.0, as OpenAI
    top_p: TopP | None = None
    max_tokens: int | None = pydantic.Field(None, ge=1)  # None: the server's default, capped to what fits
    seed: Seed | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's logs; it does not change the reply
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @pydantic.field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalties(cls, value, info):
        return _unsupported(value, info, absent=(None, 0))

    @pydantic.field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value, info):
        return _unsupported(value or None, info)

    @pydantic.field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP or not all(stops):
            raise ValueError(f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings")
        return stops

    @pydantic.model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    def stop_strings(self) -> list[str]:
        """The stop strings as a list (validation turned a single string into one)."""
        return list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[Message] = pydantic.Field(min_length=1)
    max_completion_tokens: int | None = pydantic.Field(None, ge=1)  # the newer name of max_tokens; wins over it
    logprobs: bool = False
    top_logprobs: int | None = pydantic.Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None

    @pydantic.field_validator("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls")
    @classmethod
    def _no_tools(cls, value, info):
        return _unsupported(value, info)

    @pydantic.model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' requires 'logprobs': true")
        return self

    def reply_budget(self) -> int | None:
        """max_completion_tokens, else max_tokens, else None."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    """POST /v1/completions: one prompt string, continued as is (no chat template, control tokens are parsed)."""

    prompt: str = pydantic.Field(min_length=1)
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None

    @pydantic.field_validator("echo", "best_of", "suffix", "logprobs")
    @classmethod
    def _not_served(cls, value, info):
        return _unsupported(value, info, absent=(None, False))

    def reply_budget(self) -> int | None:
        """max_tokens or None."""
        return self.max_tokens
