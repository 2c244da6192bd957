"""ChatBackend on the in-process JAX engine (default: the embedded SmolLM2-135M-Instruct)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from aloe_jax.llm.base import ChatResult, Conversation, GenerationParams
from aloe_jax.sampling.chat import ChatEngine
from aloe_jax.sampling.sampler import SamplingParams


class JaxBackend:
    """Batched local generation and option scoring; the whole batch is one decode. Built from a model name, it loads
    the model with session caches on (`sessions`, `kv_dtype`, `session_cache_bytes`: see ChatEngine); given an
    `engine`, it decodes the way that engine does."""

    def __init__(self, model: str | None = None, dtype: str = "float32", engine: ChatEngine | None = None,
                 name: str | None = None, sessions: bool = True, kv_dtype: str | None = None,
                 session_cache_bytes: int = 8 * 2**30):
        if engine is None:
            from aloe_jax.models.loader import DEFAULT_MODEL, load_model

            model = model or DEFAULT_MODEL
            engine = ChatEngine(*load_model(model, param_dtype=dtype, dtype=dtype), sessions=sessions,
                                kv_dtype=kv_dtype, session_cache_bytes=session_cache_bytes)
        self.engine = engine
        self.name = name or f"jax:{model}"

    def chat(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[ChatResult]:
        """One reply per conversation; stop strings cut the text after generation."""
        sampling = SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                  max_new_tokens=params.max_tokens, seed=params.seed)
        results = []
        for reply in self.engine.reply(conversations, sampling):
            text, reason = reply.text, reply.finish_reason
            cuts = [text.find(s) for s in params.stop if s in text]
            if cuts:
                text, reason = text[: min(cuts)], "stop"
            results.append(ChatResult(text, reason, reply.prompt_tokens, reply.completion_tokens,
                                      cached_tokens=reply.cached_tokens))
        return results

    def score_options(self, conversations: Sequence[Conversation], options: Sequence[str]) -> np.ndarray:
        """`[n, n_options]` option log-probabilities from one batched forward pass."""
        return self.engine.score_options(conversations, options)
