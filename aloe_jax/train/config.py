"""Typed config of an SFT or DPO run (configs/sft.yaml, configs/dpo.yaml + key=value overrides)."""

from __future__ import annotations

from typing import Literal

import pydantic

from aloe_jax.core.config import StrictModel
from aloe_jax.train.inputs.pipeline import DataConfig
from aloe_jax.models.sharding import MeshConfig

ObjectiveName = Literal["sft", "dpo"]  # the keys of aloe_jax.train.objectives.OBJECTIVES
DType = Literal["float32", "bfloat16"]


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
    reference: str | None = None  # model spec of the reference; None = the starting policy (`model`)


class CheckpointConfig(StrictModel):
    """Orbax checkpoints under `<output_dir>/checkpoints`."""

    every_steps: int = pydantic.Field(100, gt=0)
    max_to_keep: int | None = pydantic.Field(3, gt=0)  # None keeps every checkpoint
    resume: bool = True  # continue from the latest checkpoint in output_dir when there is one


class LogConfig(StrictModel):
    """Metrics JSONL + TensorBoard events under `<output_dir>/logs`, and the progress bar."""

    every_steps: int = pydantic.Field(1, gt=0)
    # Peak FLOP/s of one device for the MFU estimate; None looks the device kind up (CPU: MFU not reported).
    peak_flops_per_device: float | None = pydantic.Field(None, gt=0)
    progress_bar: bool = True


class EvalDataConfig(StrictModel):
    """Held-out trees whose objective loss and metrics (no gradients) are logged as eval/<name> during training."""

    path: str | None = None  # in any format `data.path` takes, packed and batched as the training data; None = off
    every: int = pydantic.Field(100, gt=0)  # steps between held-out evaluations (and one after the last step)
    batches: int | None = pydantic.Field(None, gt=0)  # the first N global batches of the held-out data; None = all


class TrainConfig(StrictModel):
    """One SFT or DPO run."""

    objective: ObjectiveName = "sft"
    model: str | None = None  # HF folder (local or gs://), a trainer checkpoint, or None for the embedded SmolLM2
    output_dir: str  # local or gs://: checkpoints, the model's config + tokenizer, logs
    param_dtype: DType = "float32"  # master weights and optimizer state
    compute_dtype: DType = "bfloat16"  # activations and matmuls
    # How the model runs (aloe_jax.models.decoder.RuntimeOptions explains each): recompute block activations in the
    # backward pass (true = "full"), scan the layers, blockwise attention, label log-probs in sequence chunks.
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"  # true / false in YAML mean full / none
    scan_layers: bool = False
    attention: Literal["auto", "dense", "blockwise"] = "auto"
    attention_block: int = pydantic.Field(512, gt=0)
    logits_chunk: int = pydantic.Field(0, ge=0)  # 0 = all positions at once
    mesh: MeshConfig = MeshConfig()
    batch_size: int = pydantic.Field(48, gt=0)  # global rows (packed conversation trees) per optimizer step
    micro_batches: int = pydantic.Field(1, gt=0)  # gradient accumulation: batch_size / micro_batches rows per pass
    max_steps: int | None = pydantic.Field(None, gt=0)  # None: as many steps as data.num_epochs give
    seed: int = 0
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    dpo: DPOConfig = DPOConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    eval_data: EvalDataConfig = EvalDataConfig()

    @pydantic.field_validator("remat", mode="before")
    @classmethod
    def _remat_bool(cls, value):
        return {True: "full", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @pydantic.model_validator(mode="after")
    def _micro_batches_divide_batch(self) -> "TrainConfig":
        if self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by micro_batches {self.micro_batches}")
        return self
