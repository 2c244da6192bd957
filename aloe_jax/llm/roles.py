"""A Role is one named LLM job (user simulator, judge, ...) on a backend, with the call cache and usage meter in
front of it. Backends are built from config and shared, so several roles on one local model load it once."""

from __future__ import annotations

import functools
import json
from typing import Literal, Sequence

import numpy as np
import pydantic

from aloe_jax.core.config import StrictModel
from aloe_jax.core.errors import ConfigError
from aloe_jax.llm.base import ChatBackend, ChatResult, Conversation, GenerationParams
from aloe_jax.llm.cache import CallCache, cache_key
from aloe_jax.llm.usage import UsageMeter


DType = Literal["float32", "bfloat16"]


class LocalModel(StrictModel):
    """A model run in this process by our sampler: where it is and the dtype its weights and computation use."""

    path: str = "smollm2-135m"  # HF folder (local or gs://), trainer run folder, or the embedded smollm2-135m
    dtype: DType = "float32"


class SessionOptions(StrictModel):
    """How an in-process model keeps conversations between calls (`sampling/sessions.py`).

    - `sessions`: decode replies through session caches: each conversation of a call is matched to the cache row
      holding its longest prefix, so a role sending the whole conversation every turn prefills only what is new. The
      replies are those of a full re-prefill; the roles sharing one model each get a pool of rows of their own.
    - `kv_dtype`: dtype of the kept keys and values; None: the compute dtype (`dtype`). bfloat16 halves the cache
      (and, on a float32 model, is no longer an exact re-prefill).
    - `session_cache_gb`: GiB the kept caches may take together; past it the least recently used pool (one role's
      rows) is dropped and that role prefills its next call in full. A role whose prompts share little with its
      previous ones (only a template header) gets a fresh pool, so the caches do fill up to this bound.

    Persona generation (one-shot prompts) runs without sessions whatever the key says.
    """

    sessions: bool = True
    kv_dtype: DType | None = None
    session_cache_gb: float = pydantic.Field(8.0, gt=0)

    def session_kwargs(self) -> dict:
        """The ChatEngine / JaxBackend keyword arguments of these options."""
        return dict(sessions=self.sessions, kv_dtype=self.kv_dtype,
                    session_cache_bytes=int(self.session_cache_gb * 2**30))


class BackendConfig(SessionOptions):
    """Which backend runs a role: `jax` (in-process model: `model` is a path or preset), `openai` (any
    OpenAI-compatible endpoint: `model` is the served model name) or `keyword` (a rule-based judge for tests and toy
    runs, `aloe_jax.rl.rewards.KeywordJudge`: a reply containing the word `model` scores 5, any other 1; give the
    judge method explicitly, `auto` reads its text). `dtype` and the session options
    (`sessions`, `kv_dtype`, `session_cache_gb`: see SessionOptions) apply to `jax` only."""

    kind: Literal["jax", "openai", "keyword"] = "jax"
    model: str = "smollm2-135m"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 5
    dtype: DType = "float32"  # jax only


@functools.lru_cache(maxsize=None)
def _backend_from_json(config_json: str) -> ChatBackend:
    cfg = BackendConfig.model_validate_json(config_json)
    if cfg.kind == "keyword":
        # The rule-based judge reads the reply out of the RL judge's prompt, a layer above this one: `aloe-jax rl`
        # builds it (aloe_jax/rl/loop.py); anywhere else the kind is a mistake.
        raise ConfigError("backend kind 'keyword' (the rule-based reward) is for `aloe-jax rl`'s judge only")
    if cfg.kind == "openai":
        from aloe_jax.llm.openai_backend import OpenAIBackend

        return OpenAIBackend(cfg.model, base_url=cfg.base_url, api_key_env=cfg.api_key_env,
                             max_concurrency=cfg.max_concurrency, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries)
    from aloe_jax.llm.jax_backend import JaxBackend

    return JaxBackend(cfg.model, dtype=cfg.dtype, **cfg.session_kwargs())


def make_backend(cfg: BackendConfig) -> ChatBackend:
    """The backend for a config; equal configs share one instance (one loaded model)."""
    return _backend_from_json(json.dumps(cfg.model_dump(), sort_keys=True))


class Role:
    """A named LLM role: cached, metered calls to a backend."""

    def __init__(self, name: str, backend: ChatBackend, cache: CallCache | None = None,
                 meter: UsageMeter | None = None):
        self.name, self.backend, self.cache, self.meter = name, backend, cache, meter

    def _key(self, kind: str, conversation: Conversation, extra) -> str:
        return cache_key(kind, self.backend.name, conversation, extra)

    def chat(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[ChatResult]:
        """One reply per conversation; cached replies are reused, the rest go to the backend as one batch."""
        keys = [self._key("chat", c, params.model_dump()) for c in conversations]
        results: list[ChatResult | None] = [None] * len(conversations)
        if self.cache is not None:
            for i, key in enumerate(keys):
                hit = self.cache.get(key)
                if hit is not None:
                    results[i] = ChatResult(**{**hit, "cached": True})
        todo = [i for i, r in enumerate(results) if r is None]
        if todo:
            fresh = self.backend.chat([conversations[i] for i in todo], params)
            for i, result in zip(todo, fresh):
                results[i] = result
                if self.cache is not None:
                    self.cache.put(keys[i], {k: v for k, v in vars(result).items() if k != "cached"})
        if self.meter is not None:
            for r in results:
                self.meter.record(self.name, self.backend.name, r.prompt_tokens, r.completion_tokens, r.cached,
                                  r.cached_tokens)
        return results

    def score_options(self, conversations: Sequence[Conversation], options: Sequence[str]) -> np.ndarray | None:
        """`[n, n_options]` option log-probabilities (cached), or None when the backend cannot score."""
        keys = [self._key("score", c, list(options)) for c in conversations]
        cached = [self.cache.get(k) for k in keys] if self.cache is not None else [None] * len(keys)
        todo = [i for i, c in enumerate(cached) if c is None]
        if todo:
            fresh = self.backend.score_options([conversations[i] for i in todo], options)
            if fresh is None:
                return None
            for i, row in zip(todo, fresh):
                cached[i] = [float(x) for x in row]
                if self.cache is not None:
                    self.cache.put(keys[i], cached[i])
        if self.meter is not None:
            # Scoring calls are counted (and cache hits seen); their tokens are not: the backends do not report them.
            fresh_rows = set(todo)
            for i in range(len(conversations)):
                self.meter.record(self.name, self.backend.name, 0, 0, cached=i not in fresh_rows)
        return np.asarray(cached, dtype=np.float64)
