"""The typed config of an ALOE evaluation run (configs/eval.yaml plus key=value overrides)."""

from __future__ import annotations

from typing import Literal

import pydantic

from aloe_jax.conversation.repeat_guard import RepeatGuardConfig
from aloe_jax.core.config import StrictModel
from aloe_jax.eval.cases import ALOE_CASES
from aloe_jax.llm.base import GenerationParams
from aloe_jax.llm.roles import BackendConfig, LocalModel, SessionOptions


class ModelUnderTest(LocalModel, SessionOptions):
    """The model being evaluated: decoded in process by our sampler, all cases of a turn in one batch, through
    session caches by default (`sessions`, `kv_dtype`, `session_cache_gb`: see SessionOptions); roles naming the same
    in-process model with the same dtype and session options share it (and its session cache, a pool per role)."""

    system_prompt: str | None = None  # None: the conversation alone, as the benchmark specifies
    generation: GenerationParams = GenerationParams(temperature=0.0, max_tokens=96)
    use_mesh: bool = True  # spread the batch over all devices when there is more than one


class SimulatorConfig(RepeatGuardConfig):
    """The user simulator: plays each case's persona, sampled (seeded per turn), a message that repeats an earlier one
    of its case resampled up to `max_resamples` times (`aloe_jax.conversation.repeat_guard`)."""

    backend: BackendConfig = BackendConfig()
    generation: GenerationParams = GenerationParams(temperature=0.7, top_p=0.9, max_tokens=64)


class KnowingConfig(StrictModel):
    """Knowing vs doing: after each turn the extractor (as in tree generation) infers the persona from the
    conversation so far, scored against the true profile and personality by MiniLM cosine similarity."""

    enabled: bool = True
    backend: BackendConfig = BackendConfig()
    generation: GenerationParams = GenerationParams(temperature=0.0, max_tokens=128)


class JudgeConfig(StrictModel):
    """The per-turn judge."""

    backend: BackendConfig = BackendConfig()
    # auto: option log-probabilities on an in-process model, strict text parsing on an API endpoint.
    method: Literal["auto", "logprobs", "text"] = "auto"
    max_retries: int = pydantic.Field(2, ge=0)
    max_tokens: int = pydantic.Field(8, gt=0)
    # Earlier exchanges shown to the judge besides the one it rates (longer context costs judge compute each turn).
    history_turns: int = pydantic.Field(2, ge=0)
    # Repeat-agreement probe: this share of (case, turn), drawn with the run seed, is scored again with the scale
    # listed backwards (5 first) and another seed; the judge is flagged when its agreement is at most chance (1/5) or
    # it chooses the first-listed score in this share of the probe's judgments.
    probe_fraction: float = pydantic.Field(0.2, ge=0.0, le=1.0)
    flag_first_shown: float = pydantic.Field(0.8, gt=0.0, le=1.0)

    def resolved_method(self) -> Literal["logprobs", "text"]:
        """The scoring method actually used."""
        if self.method != "auto":
            return self.method
        return "logprobs" if self.backend.kind == "jax" else "text"


class EvalConfig(StrictModel):
    """One ALOE evaluation: which cases, how many turns, the three roles, and the run folder."""

    output_dir: str = "runs/eval"  # local run folder: records, report, plot; rerunning with it resumes
    aloe_data: str | None = None  # folder (local or gs://) with the released eval pools; None: the pinned repository
    cases: int = pydantic.Field(ALOE_CASES, ge=1, le=ALOE_CASES)
    turns: int = pydantic.Field(10, ge=1)
    seed: int = pydantic.Field(0, ge=0)
    model: ModelUnderTest = ModelUnderTest()
    simulator: SimulatorConfig = SimulatorConfig()
    judge: JudgeConfig = JudgeConfig()
    knowing: KnowingConfig = KnowingConfig()
    bootstrap_resamples: int = pydantic.Field(2000, ge=0)
    cache_calls: bool = True  # keep simulator/judge calls in <output_dir>/calls.sqlite so a rerun costs nothing
    progress_bar: bool = True


class CompareConfig(StrictModel):
    """`aloe-jax eval-compare`: paired differences between finished runs, the first one the baseline."""

    runs: list[str] = []  # run folders written by `aloe-jax eval`
    output_dir: str = "runs/compare"  # compare.md and al_curve.png
    bootstrap_resamples: int = pydantic.Field(2000, ge=0)
    seed: int = pydantic.Field(0, ge=0)
