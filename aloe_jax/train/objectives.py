"""Training objectives as plug-ins: each owns the batch fields it reads, whether it needs a frozen reference model, its
loss as sums and weights, its metrics and its FLOP count; the trainer and the step look one up once, in `OBJECTIVES`
(docs/DESIGN.md §6).

Losses are returned as *sums* with the `weight` they are to be divided by (target tokens for SFT, pairs for DPO): the
step adds them up over micro-batches (and the held-out hook over batches) and divides once at the end, so gradient
accumulation gives the same update as one larger batch.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from aloe_jax.models import lora
from aloe_jax.models.attention import TreeMask
from aloe_jax.models.config import ModelConfig
from aloe_jax.train import losses
from aloe_jax.train.config import DPOConfig, GRPOConfig, TrainConfig

# The fields of a collated batch (aloe_jax/train/inputs/batch.py) that one forward pass over packed rows reads.
FORWARD_FIELDS = ("tokens", "positions", "segment", "visible_prefix", "labels")


def forward_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Model FLOPs of one token's forward pass attending over `context` positions: 2 per matmul weight, plus the
    attention scores and their weighted sum."""
    # The input embedding is a lookup, not a matmul; a tied embedding is counted once, as the output head.
    matmul_params = cfg.num_params() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    attention = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context  # QK^T and PV
    return 2 * matmul_params + attention


def batch_label_logprobs(graphdef: nnx.GraphDef, params: nnx.State, batch: dict,
                         dropout_key: jax.Array | None = None) -> jax.Array:
    """`[rows, seq]` float32 log p(label) of every position of the packed rows of `batch`, under `params` (with LoRA
    dropout when a key is given)."""
    model = nnx.merge(graphdef, params)
    # The mask goes in as per-token segments: the model builds it per attention block, or whole for dense attention.
    mask = TreeMask(batch["segment"], batch["visible_prefix"])
    hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], mask, dropout_key=dropout_key)
    return model.label_logprobs(hidden, batch["labels"])


def reference_logprobs(graphdef: nnx.GraphDef, params: nnx.State, ref_params: nnx.State | None, batch: dict,
                       reference_is_base: bool) -> jax.Array:
    """`[rows, seq]` label log-probs under the frozen reference (no gradient): `ref_params`, or — with
    `reference_is_base` — the policy's own params with the LoRA adapters switched off (no copy held)."""
    if reference_is_base:
        ref_params = lora.adapter_off(params)
    return jax.lax.stop_gradient(batch_label_logprobs(graphdef, ref_params, batch))


class Objective(abc.ABC):
    """What one training objective contributes to a step; the rest of the step (micro-batches, normalisation,
    optimizer) is the same for every objective."""

    name: ClassVar[str]  # as in the config's `objective` and the run folder's aloe_run.json
    batch_fields: ClassVar[tuple[str, ...]]  # the collated fields `loss_sums` reads; the step receives only these
    rejected_branches: ClassVar[bool]  # whether the packer must pack each turn's rejected reply
    needs_reference: ClassVar[bool]  # whether `loss_sums` takes the params of a frozen reference model
    forward_passes: ClassVar[int]  # forward-pass equivalents per trained token: 3 for forward + backward

    @classmethod
    @abc.abstractmethod
    def from_config(cls, cfg: TrainConfig) -> "Objective":
        """This objective with the settings of a run's config."""

    @property
    def reference_model(self) -> str | None:
        """Model spec of the frozen reference, or None for a copy of the starting policy."""
        return None

    @property
    def holds_reference(self) -> bool:
        """Whether the trainer must hold reference params for `loss_sums` (not when the reference is the policy's
        base without its LoRA adapters)."""
        return self.needs_reference

    @abc.abstractmethod
    def loss_sums(self, graphdef: nnx.GraphDef, params: nnx.State, ref_params: nnx.State | None, batch: dict,
                  dropout_key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(loss summed over the batch's targets, {"weight": their count, metric: metric summed over them});
        `dropout_key` is given in training steps only."""

    def flops_per_token(self, cfg: ModelConfig, seq_len: int) -> float:
        """Model FLOPs of one optimizer step per packed token of `seq_len`-token rows."""
        return self.forward_passes * forward_flops_per_token(cfg, seq_len)


@dataclasses.dataclass(frozen=True)
class SFT(Objective):
    """Supervised fine-tuning: mean negative log-likelihood of the preferred replies of judged turns."""

    name: ClassVar[str] = "sft"
    batch_fields: ClassVar[tuple[str, ...]] = (*FORWARD_FIELDS, "sft_weight")
    rejected_branches: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = False
    forward_passes: ClassVar[int] = 3

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "SFT":
        return cls()

    def loss_sums(self, graphdef, params, ref_params, batch, dropout_key=None):
        loss, weight = losses.sft_loss(batch_label_logprobs(graphdef, params, batch, dropout_key), batch["sft_weight"])
        return loss, {"weight": weight}


def pair_logprobs(token_logps: jax.Array, batch: dict, length_normalise: bool) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) `[rows, max_pairs]` summed (or per-token mean) log-probs of each pair's replies."""
    num_replies = 2 * batch["pair_chosen"].shape[1]
    in_reply = batch["reply_index"] >= 0
    sums = losses.reply_sums(token_logps * in_reply, batch["reply_index"], num_replies)  # [rows, replies]
    if length_normalise:
        lengths = losses.reply_sums(in_reply.astype(jnp.float32), batch["reply_index"], num_replies)
        sums = sums / jnp.maximum(lengths, 1.0)
    pick = lambda index: jnp.take_along_axis(sums, index, axis=1)  # noqa: E731
    return pick(batch["pair_chosen"]), pick(batch["pair_rejected"])


@dataclasses.dataclass(frozen=True)
class DPO(Objective):
    """Direct preference optimisation on each judged turn's (preferred, rejected) pair against a frozen reference,
    with the loss type, β and label smoothing of `config`; with `reference_is_base`, the reference is the policy's
    own params with the LoRA adapters switched off."""

    config: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    reference_is_base: bool = False
    name: ClassVar[str] = "dpo"
    batch_fields: ClassVar[tuple[str, ...]] = (*FORWARD_FIELDS, "reply_index", "pair_chosen", "pair_rejected",
                                               "pair_weight")
    rejected_branches: ClassVar[bool] = True
    needs_reference: ClassVar[bool] = True
    forward_passes: ClassVar[int] = 4  # the policy's forward and backward, and the reference's forward

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "DPO":
        return cls(cfg.dpo, reference_is_base=cfg.lora is not None and cfg.dpo.reference is None)

    @property
    def reference_model(self) -> str | None:
        return self.config.reference

    @property
    def holds_reference(self) -> bool:
        return not self.reference_is_base

    def loss_sums(self, graphdef, params, ref_params, batch, dropout_key=None):
        dpo = self.config
        logps = batch_label_logprobs(graphdef, params, batch, dropout_key)
        # The reference log-probs are computed here, per micro-batch, with the frozen reference params rather than
        # in a separate pass before training: one extra forward (about a third of a training step's compute) costs
        # less than a full pass over the data plus storing and re-joining per-pair values with a shuffled, packed,
        # resumable stream, and it keeps every batch self-contained.
        ref_logps = reference_logprobs(graphdef, params, ref_params, batch, self.reference_is_base)
        normalise = dpo.loss_type == "ipo"
        chosen, rejected = pair_logprobs(logps, batch, normalise)
        ref_chosen, ref_rejected = pair_logprobs(ref_logps, batch, normalise)
        loss, weight, metrics = losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, batch["pair_weight"],
                                                dpo.beta, dpo.loss_type, dpo.label_smoothing)
        return loss, {"weight": weight, **metrics}


def per_token(values: jax.Array, reply_index: jax.Array) -> jax.Array:
    """`[rows, seq]` value of each token's reply from `[rows, replies]` per-reply values (0 off replies)."""
    return jnp.take_along_axis(values, jnp.maximum(reply_index, 0), axis=1) * (reply_index >= 0)


@dataclasses.dataclass(frozen=True)
class GRPO(Objective):
    """Group-relative policy optimisation on tree-packed RL rollouts (aloe_jax/rl): every sampled candidate reply of
    a rollout tree is a reply of one packed row, with its group-normalised advantage (`reply_advantage`, computed on
    the host by `losses.group_advantages` over its G siblings) and `reply_weight` 0 for one without a score. The
    clipped ratio is against `old_logprobs`: the policy's label log-probs at rollout time, computed by the trainer's
    forward on the same packed rows before the first update of the batch (so the ratio is exactly 1 then, and no
    sampler-vs-trainer numerics enter it). The KL to the frozen reference (k3) is computed per micro-batch, as DPO's
    reference log-probs are.

    The loss weight is the number of weighted reply tokens (grpo: a token mean) or replies × `budget_tokens`
    (dr_grpo); `reply_tokens` is summed beside the metrics so that token means of kl, clip fraction, ratio and the
    sampled-token entropy estimate (−old logp) are metric / reply_tokens for either variant."""

    config: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    reference_is_base: bool = False
    name: ClassVar[str] = "grpo"
    batch_fields: ClassVar[tuple[str, ...]] = (*FORWARD_FIELDS, "reply_index", "reply_advantage", "reply_weight",
                                               "old_logprobs")
    rejected_branches: ClassVar[bool] = True

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "GRPO":
        return cls(cfg.grpo, reference_is_base=cfg.lora is not None and cfg.grpo.reference is None)

    @property
    def needs_reference(self) -> bool:  # type: ignore[override]
        return self.config.kl_coef > 0

    @property
    def forward_passes(self) -> int:  # type: ignore[override]
        return 4 if self.needs_reference else 3

    @property
    def reference_model(self) -> str | None:
        return self.config.reference

    @property
    def holds_reference(self) -> bool:
        return self.needs_reference and not self.reference_is_base

    def loss_sums(self, graphdef, params, ref_params, batch, dropout_key=None):
        grpo = self.config
        logps = batch_label_logprobs(graphdef, params, batch, dropout_key)
        ref_logps = None
        if self.needs_reference:
            ref_logps = reference_logprobs(graphdef, params, ref_params, batch, self.reference_is_base)
        old = jax.lax.stop_gradient(batch["old_logprobs"])
        reply_index = batch["reply_index"]
        weight = per_token(batch["reply_weight"], reply_index)  # [rows, seq]: 1 on a scored reply's tokens
        advantage = per_token(batch["reply_advantage"], reply_index)
        token_loss, parts = losses.grpo_token_losses(logps, old, ref_logps, advantage, grpo.clip_low,
                                                     grpo.clip_high, grpo.kl_coef)
        reply_tokens = jnp.sum(weight)
        normaliser = reply_tokens if grpo.variant == "grpo" else jnp.sum(batch["reply_weight"]) * grpo.budget_tokens
        weighted = lambda x: jnp.sum(x * weight)  # noqa: E731
        return weighted(token_loss), {"weight": normaliser, "reply_tokens": reply_tokens,
                                      "kl": weighted(parts["kl"]), "clip_fraction": weighted(parts["clipped"]),
                                      "ratio": weighted(parts["ratio"]), "entropy": weighted(-old)}


# Name → objective: the one place an objective's name is looked up (a new objective is one class and one entry).
OBJECTIVES: dict[str, type[Objective]] = {objective.name: objective for objective in (SFT, DPO, GRPO)}


def objective_of(cfg: TrainConfig) -> Objective:
    """The objective a run's config names, with that config's settings."""
    return OBJECTIVES[cfg.objective].from_config(cfg)
