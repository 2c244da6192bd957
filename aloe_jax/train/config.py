"""Typed configs of an SFT or DPO run (configs/sft.yaml, configs/dpo.yaml + key=value overrides) and of `export`."""

from __future__ import annotations

from typing import Literal

import pydantic

from aloe_jax.core.config import StrictModel
from aloe_jax.llm.roles import DType, LocalModel
from aloe_jax.models.lora import LoraConfig
from aloe_jax.models.sharding import MeshConfig
from aloe_jax.train.inputs.pipeline import DataConfig

ObjectiveName = Literal["sft", "dpo", "grpo"]  # the keys of aloe_jax.train.objectives.OBJECTIVES


class TrainedModel(LocalModel):
    """The starting model of a run: `dtype` is what activations and matmuls use, `param_dtype` what the master
    weights and optimizer state are kept in."""

    dtype: DType = "bfloat16"
    param_dtype: DType = "float32"


class ExportConfig(StrictModel):
    """`aloe-jax export`: a trainer checkpoint's weights, in `model.dtype`, as an HF model folder (a LoRA run's
    adapters merged in), or a LoRA run's adapters as a PEFT adapter folder."""

    model: LocalModel = LocalModel(path="")  # run folder, its checkpoints folder, or checkpoints/<step>
    output_dir: str | None = None  # the HF folder (local or gs://)
    adapter: bool = False  # write only the LoRA adapters, as a PEFT adapter folder (base: the run's base model)


class OptimConfig(StrictModel):
    """AdamW with global-norm clipping on a warmup + decay schedule."""

    lr: float = pydantic.Field(1e-5, gt=0)  # ALOE's SFT and DPO learning rate
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int | None = pydantic.Field(None, ge=0)  # wins over warmup_ratio when set
    warmup_ratio: float = pydantic.Field(0.1, ge=0, le=1)
    min_lr_ratio: float = pydantic.Field(0.0, ge=0, le=1)  # final lr = lr · min_lr_ratio
    weight_decay: float = pydantic.Field(0.0, ge=0)
    b1: float = pydantic.Field(0.9, ge=0, lt=1)
    b2: float = pydantic.Field(0.999, ge=0, lt=1)
    eps: float = pydantic.Field(1e-8, gt=0)
    clip_norm: float = pydantic.Field(1.0, ge=0)  # 0 disables clipping


class DPOConfig(StrictModel):
    """DPO loss and its frozen reference model."""

    beta: float = pydantic.Field(0.9, gt=0)  # ALOE's β
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = pydantic.Field(0.0, ge=0, lt=0.5)  # sigmoid only (conservative DPO)
    reference: str | None = None  # model spec of the reference; None = the starting policy (`model.path`)


class GRPOConfig(StrictModel):
    """Group-relative policy optimisation on scored rollout candidates (`aloe-jax rl`).

    grpo: advantages are rewards minus their group's mean over its std (+ 1e-4), the loss a mean over reply tokens;
    dr_grpo (Liu et al., "Understanding R1-Zero-like training"): no division by the std, and the token losses summed
    and divided by a constant (replies × `budget_tokens`) instead of the tokens there are, so neither a group's
    spread nor a reply's length scales its update."""

    variant: Literal["grpo", "dr_grpo"] = "grpo"
    clip_low: float = pydantic.Field(0.2, ge=0, lt=1)  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = pydantic.Field(0.2, ge=0)  # > clip_low is DAPO's clip-higher
    kl_coef: float = pydantic.Field(0.04, ge=0)  # k3 KL to the frozen reference; 0 holds no reference
    reference: str | None = None  # model spec of the reference; None = the starting policy (lora: the base)
    epochs: int = pydantic.Field(1, gt=0)  # optimizer steps on each rollout batch
    budget_tokens: int = pydantic.Field(128, gt=0)  # dr_grpo's per-reply normaliser (rl sets it to max_tokens)


class CheckpointConfig(StrictModel):
    """Orbax checkpoints under `<output_dir>/checkpoints`."""

    every_steps: int = pydantic.Field(50, gt=0)
    max_to_keep: int | None = pydantic.Field(3, gt=0)  # None keeps every checkpoint
    resume: bool = True  # continue from the latest checkpoint in output_dir when there is one


class WandbConfig(StrictModel):
    """A Weights & Biases run that gets the metrics the JSONL and TensorBoard files get, with the resolved config as
    its config. Credentials and offline mode come from W&B's own environment (WANDB_API_KEY, WANDB_MODE, WANDB_DIR)."""

    project: str
    run: str | None = None  # the run's display name; None lets W&B name it
    entity: str | None = None  # team or user; None = the account's default entity
    group: str | None = None
    tags: list[str] = []


class LogConfig(StrictModel):
    """Metrics JSONL + TensorBoard events under `<output_dir>/logs` (and W&B when `wandb` is set), and the progress
    bar."""

    every_steps: int = pydantic.Field(1, gt=0)
    # Peak FLOP/s of one device for the MFU estimate; None looks the device kind up (CPU: MFU not reported).
    peak_flops_per_device: float | None = pydantic.Field(None, gt=0)
    progress_bar: bool = True
    wandb: WandbConfig | None = None  # None = off; needs the `wandb` extra (pip install 'aloe-jax[wandb]')


class EvalDataConfig(StrictModel):
    """Held-out trees whose objective loss and metrics (no gradients) are logged as eval/<name> during training."""

    path: str | None = None  # in any format `data.path` takes, packed and batched as the training data; None = off
    every: int = pydantic.Field(100, gt=0)  # steps between held-out evaluations (and one after the last step)
    batches: int | None = pydantic.Field(None, gt=0)  # the first N global batches of the held-out data; None = all


class TrainConfig(StrictModel):
    """One SFT or DPO run."""

    objective: ObjectiveName = "sft"
    model: TrainedModel = TrainedModel()
    output_dir: str = "runs/sft-smollm2"  # local or gs://: checkpoints, the model's config + tokenizer, logs
    # How the model runs (aloe_jax.models.decoder.RuntimeOptions explains each): recompute block activations in the
    # backward pass (true = "full"), scan the layers, blockwise attention, label log-probs in sequence chunks.
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"  # true / false in YAML mean full / none
    scan_layers: bool = False
    attention: Literal["auto", "dense", "blockwise"] = "auto"
    attention_block: int = pydantic.Field(512, gt=0)
    logits_chunk: int = pydantic.Field(0, ge=0)  # 0 = all positions at once
    mesh: MeshConfig = MeshConfig()
    # Global rows (packed conversation trees, up to 10 turns each) per optimizer step: 8 trees ≈ 80 replies, the
    # closest multiple of a typical mesh to the paper's 48 examples.
    batch_size: int = pydantic.Field(8, gt=0)
    micro_batches: int = pydantic.Field(1, gt=0)  # gradient accumulation: batch_size / micro_batches rows per pass
    max_steps: int | None = pydantic.Field(None, gt=0)  # None: what data.num_epochs give; more repeats the data
    seed: int = 0
    data: DataConfig = DataConfig(path="data/trees/trees.jsonl", seq_len=4096)  # what `aloe-jax trees` writes
    optim: OptimConfig = OptimConfig()
    dpo: DPOConfig = DPOConfig()
    grpo: GRPOConfig = GRPOConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    eval_data: EvalDataConfig = EvalDataConfig()
    lora: LoraConfig | None = None  # train LoRA adapters on a frozen base instead of every weight; None = off

    @pydantic.field_validator("remat", mode="before")
    @classmethod
    def _remat_bool(cls, value):
        return {True: "full", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @pydantic.model_validator(mode="after")
    def _micro_batches_divide_batch(self) -> "TrainConfig":
        if self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by micro_batches {self.micro_batches}")
        return self
