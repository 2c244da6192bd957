"""The typed config of an RL run (configs/rl.yaml + key=value overrides): the trainer's settings (objective grpo)
plus the rollouts, the rewards and the roles that converse with and score the policy."""

from __future__ import annotations

from typing import Literal

import pydantic

from aloe_jax.conversation.repeat_guard import RepeatGuardConfig
from aloe_jax.core.config import StrictModel
from aloe_jax.eval.config import JudgeConfig, KnowingConfig, SimulatorConfig
from aloe_jax.llm.base import GenerationParams
from aloe_jax.train.config import TrainConfig


class RolloutConfig(StrictModel):
    """What one iteration's rollouts are: `cases` conversations of `turns` turns; at every turn the policy samples
    `group_size` candidate replies, the judge (and the other rewards) scores each, and one of them continues the
    conversation (`selection`: the best — ties to the first —, one at random, or one drawn with probability
    proportional to its reward)."""

    cases: int = pydantic.Field(8, gt=0)  # conversations per iteration = rows of the update batch
    group_size: int = pydantic.Field(4, ge=2)  # G
    turns: int = pydantic.Field(3, gt=0)  # K
    selection: Literal["best", "random", "sampled"] = "best"
    generation: GenerationParams = GenerationParams(temperature=1.0, top_p=1.0, max_tokens=96)
    system_prompt: str | None = None
    pool_split: Literal["train", "eval"] = "train"  # which ALOE pools the cases come from
    aloe_data: str | None = None  # folder (local or gs://) with the ALOE pools; None: the pinned repository
    batch_size: int | None = pydantic.Field(None, gt=0)  # conversations per engine batch; None: all of them
    sessions: bool = True  # the policy keeps each conversation's KV between turns (reset whenever the weights change)


class RewardConfig(StrictModel):
    """reward = judge·s + persona·p − length·l per candidate, each component logged: s the judge's 1–5 score
    (expected score from option log-probs on a local judge, the parsed digit on an API), p the MiniLM cosine
    similarity of an inferred persona with the true one (`persona_source`: a `<persona>…</persona>` block the policy
    writes — stripped from the visible reply — or the extractor role on the conversation with the candidate), l the
    candidate's completion tokens over max_tokens."""

    judge: float = 1.0
    persona: float = 0.0
    length: float = 0.0
    persona_source: Literal["tag", "extractor"] = "tag"
    persona_tag: str = "persona"


class PackedRows(StrictModel):
    """The update batch's rows: one packed rollout tree each (the data are the rollouts, so there is no path)."""

    seq_len: int = pydantic.Field(4096, gt=0)  # the spine plus G − 1 branches per turn, cut at turns to fit


class RLConfig(TrainConfig):
    """One RL run: `iterations` × (rollouts → `grpo.epochs` optimizer steps on them)."""

    objective: Literal["grpo"] = "grpo"
    output_dir: str = "runs/rl-smollm2"  # local or gs://: checkpoints, the model's config + tokenizer, logs
    # Local folder of the rollouts and the call cache; None: output_dir when local, else a folder of the local cache.
    rollout_dir: str | None = None
    iterations: int = pydantic.Field(20, gt=0)
    batch_size: int = pydantic.Field(0, ge=0)  # rows per step: always rollout.cases (0 = filled in)
    data: PackedRows = PackedRows()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    simulator: SimulatorConfig = SimulatorConfig()
    judge: JudgeConfig = JudgeConfig()
    extractor: KnowingConfig = KnowingConfig(enabled=False)  # for reward.persona_source = extractor
    cache_calls: bool = True  # simulator / judge / extractor calls in <output_dir>/calls.sqlite (a resume replays)

    @pydantic.model_validator(mode="after")
    def _fill_in(self) -> "RLConfig":
        if self.batch_size and self.batch_size != self.rollout.cases:
            raise ValueError(f"batch_size {self.batch_size} must equal rollout.cases {self.rollout.cases} (one row "
                             f"per rollout tree); set rollout.cases")
        self.__dict__["batch_size"] = self.rollout.cases  # not setattr: assignment validation would recurse
        if self.batch_size % self.micro_batches:
            raise ValueError(f"rollout.cases {self.rollout.cases} is not divisible by micro_batches "
                             f"{self.micro_batches}")
        self.grpo.budget_tokens = self.rollout.generation.max_tokens
        if self.reward.persona and self.reward.persona_source == "extractor":
            self.extractor.enabled = True
        return self
