"""ChatBackend on any OpenAI-compatible endpoint (OpenAI, vLLM, `aloe-jax serve`), through the `openai` package.

Retries with exponential backoff and jitter on 408/409/429/5xx, connection errors and timeouts are the `openai`
client's own (`max_retries`). A 200 whose body is not a chat completion (not JSON, plain text, no choices) the client
hands back as-is, so we retry those ourselves, with the same backoff and count; final failures become one clear error.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import random
import time
from typing import Sequence

import numpy as np

from aloe_jax.core.errors import AloeError
from aloe_jax.core.redact import redact_urls
from aloe_jax.llm.base import ChatResult, Conversation, GenerationParams


class BackendError(AloeError):
    """An LLM endpoint refused or kept failing a call after all retries."""


class OpenAIBackend:
    """Chat completions on an OpenAI-compatible server; conversations are sent concurrently."""

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", max_concurrency: int = 8, timeout_s: float = 120.0,
                 max_retries: int = 5):
        import openai

        key = api_key or os.environ.get(api_key_env)
        if not key and base_url is None:
            raise AloeError(f"no API key: set {api_key_env} (or give base_url for a local server that needs none)")
        self.model = model
        # The name goes into cache keys, protocol cards, usage summaries and error lines: never a key in the URL.
        self.name = redact_urls(f"openai:{model}@{base_url or 'api.openai.com'}")
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self._openai = openai
        self.client = openai.OpenAI(api_key=key or "unused", base_url=base_url, timeout=timeout_s,
                                    max_retries=max_retries)

    def _create(self, **kwargs):
        """A chat completion with at least one choice holding a message; malformed 200s are retried."""
        for attempt in range(self.max_retries + 1):
            if attempt:
                # The openai client's own schedule: doubling from 0.5 s up to 8 s, less up to a quarter of jitter.
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0) * (1 - 0.25 * random.random()))
            try:
                response = self._request(**kwargs)
            except json.JSONDecodeError:
                problem = "a body that is not JSON"
                continue
            choices = getattr(response, "choices", None)
            if not isinstance(choices, list):
                problem = f"no choices ({type(response).__name__} body)" if choices is None else "malformed choices"
            elif not choices or choices[0].message is None:
                problem = "an empty choices list" if not choices else "a choice without a message"
            else:
                return response
        raise BackendError(f"{self.name}: answered 200 with {problem}, {self.max_retries + 1} times: not an "
                           f"OpenAI-compatible chat completions endpoint, or a broken proxy in front of one")

    def _request(self, **kwargs):
        try:
            return self.client.chat.completions.create(model=self.model, **kwargs)
        except self._openai.AuthenticationError as err:
            raise BackendError(f"{self.name}: authentication failed ({err.status_code}); check the API key") from None
        except self._openai.APIStatusError as err:
            raise BackendError(f"{self.name}: HTTP {err.status_code}: {redact_urls(err.message)}") from None
        except (self._openai.APIConnectionError, self._openai.APITimeoutError) as err:
            raise BackendError(f"{self.name}: no answer after retries ({type(err).__name__}: "
                               f"{redact_urls(str(err))})") from None

    def _one(self, conversation: Conversation, params: GenerationParams) -> ChatResult:
        response = self._create(
            messages=conversation, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens,
            stop=list(params.stop) or None, seed=params.seed,
        )
        choice = response.choices[0]
        usage = response.usage
        return ChatResult(
            text=choice.message.content or "",
            finish_reason="length" if choice.finish_reason == "length" else "stop",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
        )

    def _map(self, fn, items):
        with concurrent.futures.ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(fn, items))

    def chat(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[ChatResult]:
        """One reply per conversation (requests run concurrently, results in order)."""
        return self._map(lambda c: self._one(c, params), conversations)

    def score_options(self, conversations: Sequence[Conversation], options: Sequence[str]) -> np.ndarray | None:
        """Log-probabilities of single-token options from the first generated token's top_logprobs (-inf when an
        option is not among them); None when the endpoint does not return logprobs."""

        def one(conversation):
            response = self._create(messages=conversation, temperature=0.0, max_tokens=1, logprobs=True,
                                    top_logprobs=20)
            content = response.choices[0].logprobs and response.choices[0].logprobs.content
            if not content:
                return None
            top = {t.token.strip(): t.logprob for t in content[0].top_logprobs}
            return [top.get(option.strip(), -math.inf) for option in options]

        rows = self._map(one, conversations)
        return None if any(r is None for r in rows) else np.asarray(rows, dtype=np.float64)
