"""Typed config of data generation (`configs/datagen.yaml`): which backend and sampling settings each LLM role uses,
how persona pools grow, how trees are planned, where outputs go, and the price table for cost reports."""

from __future__ import annotations

from typing import Literal

import pydantic

from aloe_jax.conversation.repeat_guard import RepeatGuardConfig
from aloe_jax.core.config import StrictModel
from aloe_jax.llm.base import GenerationParams
from aloe_jax.llm.roles import BackendConfig
from aloe_jax.llm.usage import Price

# Near-duplicate thresholds calibrated for our encoder, all-MiniLM-L6-v2 (the paper's 0.6 was set for
# paraphrase-MiniLM-L6-v2, under which the released pools are far less similar; configs/datagen.yaml shows the numbers).
CALIBRATED_THRESHOLD = {"profile": 0.83, "personality": 0.93}

ROLE_NAMES = ("persona_generator", "user", "extractor", "hinted", "plain", "judge")


class RoleConfig(StrictModel):
    """One LLM role: the backend it runs on and its sampling settings."""

    backend: BackendConfig = BackendConfig()
    generation: GenerationParams = GenerationParams(max_tokens=128)


class RolesConfig(StrictModel):
    """Every role of persona and tree generation."""

    persona_generator: RoleConfig = RoleConfig(generation=GenerationParams(temperature=0.9, top_p=0.95, max_tokens=160))
    user: RoleConfig = RoleConfig(generation=GenerationParams(temperature=0.7, top_p=0.95, max_tokens=96))
    extractor: RoleConfig = RoleConfig(generation=GenerationParams(temperature=0.0, max_tokens=128))
    hinted: RoleConfig = RoleConfig(generation=GenerationParams(temperature=0.7, top_p=0.95, max_tokens=160))
    plain: RoleConfig = RoleConfig(generation=GenerationParams(temperature=0.7, top_p=0.95, max_tokens=160))
    judge: RoleConfig = RoleConfig(generation=GenerationParams(temperature=0.0, max_tokens=8))


class PersonasConfig(StrictModel):
    """Growing a profile or personality pool from seed entries by self-generation."""

    kind: Literal["profile", "personality"] = "profile"
    seeds: str | None = None  # JSONL of strings; None: the released ALOE train pool of `kind` (from `aloe_data`)
    output: str = "data/personas/{kind}.jsonl"  # local or gs://; holds the seeds followed by accepted entries
    target_size: int = pydantic.Field(400, gt=0)
    examples_per_prompt: int = pydantic.Field(5, gt=0)
    candidates_per_prompt: int = pydantic.Field(20, gt=0)
    prompts_per_round: int = pydantic.Field(4, gt=0)  # prompts sent as one batch per round
    max_rounds: int = pydantic.Field(100, gt=0)
    min_words: int = pydantic.Field(8, ge=1)  # shorter parsed lines are list debris, not personas
    threshold: dict[Literal["profile", "personality"], float] = CALIBRATED_THRESHOLD

    @pydantic.field_validator("threshold")
    @classmethod
    def _cosine_range(cls, value: dict) -> dict:
        for kind, t in value.items():
            if not -1.0 <= t <= 1.0:
                raise ValueError(f"threshold for {kind} is a cosine similarity and must lie in [-1, 1], got {t}")
        return value


class TreesConfig(RepeatGuardConfig):
    """The sampling plan and protocol of tree generation; `max_resamples` and `repeat_threshold` are the user
    simulator's repeat guard (`aloe_jax.conversation.repeat_guard`)."""

    profiles: str | None = None  # JSONL of strings; None: the released ALOE train profiles (from `aloe_data`)
    personalities: str | None = None
    conversations: int = pydantic.Field(3000, gt=0)  # planned (profile, personality) pairs, drawn without repeats
    turns: int = pydantic.Field(10, gt=0)
    batch_size: int = pydantic.Field(32, gt=0)  # conversations advancing together (one batch per role and turn)
    judge_order: Literal["random", "both"] = "random"
    continue_with: Literal["random", "preferred", "rejected", "hinted"] = "random"
    judge_retries: int = pydantic.Field(2, ge=0)  # extra attempts when a text judge's answer does not parse
    # Judge calibration (judge_order random): this share of turns, drawn with the conversation seed, is judged in the
    # swapped order too; agreement and first-shown rates go in the run summary (the data keep the first verdict). A
    # judge is flagged when its agreement is at most chance or it picks the first-shown reply this often.
    judge_swap_fraction: float = pydantic.Field(0.1, ge=0.0, le=1.0)
    judge_flag_first_shown: float = pydantic.Field(0.8, gt=0.0, le=1.0)
    output: str = "data/trees/trees.jsonl"  # local or gs://
    state_dir: str = "data/trees/state"  # local: committed turns, call cache and run log, for resuming

    @pydantic.field_validator("state_dir")
    @classmethod
    def _local_state(cls, value: str) -> str:
        # The state is appended to with fsync and holds a SQLite file: both need a local filesystem.
        if value.startswith("gs://"):
            raise ValueError("must be a local folder (appends and SQLite need local disk); the output may be gs://")
        return value


class ContaminationConfig(StrictModel):
    """`aloe-jax contamination`: which pools to compare (None: the released ALOE ones) and where the report goes."""

    train_profile: str | None = None  # JSONL of strings
    eval_profile: str | None = None
    train_personality: str | None = None
    eval_personality: str | None = None
    output: str | None = None  # per-persona report JSONL (local or gs://); None: only the summary tables


class DatagenConfig(StrictModel):
    """Everything `aloe-jax personas`, `trees` and `contamination` read."""

    seed: int = 0
    aloe_data: str | None = None  # folder (local/gs://) or URL of the ALOE pool files; None: pinned GitHub revision
    cache: str = "data/personas/calls.sqlite"  # call cache of persona generation (trees keep theirs in state_dir)
    roles: RolesConfig = RolesConfig()
    personas: PersonasConfig = PersonasConfig()
    trees: TreesConfig = TreesConfig()
    contamination: ContaminationConfig = ContaminationConfig()
    prices: dict[str, Price] = {}  # backend name (e.g. "openai:gpt-4o-mini@api.openai.com") → $ per million tokens


class ExportTreesConfig(StrictModel):
    """`aloe-jax export-trees`: tree JSONL files to Parquet (the tree schema, or TRL's DPO / SFT datasets) and/or TFDS
    ArrayRecord."""

    train: list[str] = []  # tree JSONL files (local or gs://) of the train split
    eval: list[str] = []  # of the eval split
    output_dir: str | None = None  # local or gs://; format both writes <output_dir>/parquet and <output_dir>/tfds
    # trees: Parquet of the tree schema (`parquet` is its older name); trl-dpo / trl-sft: Parquet that TRL's
    # DPOTrainer / SFTTrainer read (data_pipeline/export.py says which rows); tfds: TFDS ArrayRecord; both: trees and
    # tfds.
    format: Literal["trees", "trl-dpo", "trl-sft", "tfds", "both", "parquet"] = "both"
