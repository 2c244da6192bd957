"""The jit-compiled optimizer step shared by SFT and DPO, with explicit shardings over the (data, fsdp, tensor) mesh.

A step takes one global batch (the `collate` dict of aloe_jax/train/inputs/batch.py, rows split over data×fsdp), splits it
into micro-batches, and accumulates *unnormalised* gradients (loss sums) over them in a `lax.scan`. Only after the
last micro-batch are gradients and loss divided by the total number of target tokens (SFT) or pairs (DPO) of the
whole batch, so accumulating over k micro-batches gives the same update as one k-times larger batch — dividing per
micro-batch would over-weight micro-batches with few targets.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aloe_jax.models import sharding
from aloe_jax.models.attention import TreeMask
from aloe_jax.train import losses
from aloe_jax.train.config import DPOConfig, Objective


class TrainState(NamedTuple):
    """Everything an optimizer step updates (and a checkpoint holds, besides the data iterator)."""

    step: jax.Array  # int32 []: optimizer steps taken
    params: nnx.State  # master weights (param_dtype)
    opt_state: optax.OptState
    rng: jax.Array  # uint32 [2]: split once per step, so any stochastic part of a step resumes exactly


def init_state(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0: fresh optimizer state for `params` (which it shares, so do not donate them elsewhere)."""
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(seed))


def state_shardings(params_shardings: nnx.State, abstract_state: TrainState, tx: optax.GradientTransformation,
                    mesh: Mesh) -> TrainState:
    """Shardings of a TrainState: optimizer moments like their parameters, counters replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, params_shardings,
                                transform_non_params=lambda _: replicated)
    return TrainState(replicated, params_shardings, opt, replicated)


def batch_shardings(batch: dict, mesh: Mesh) -> dict:
    """Rows of every batch field split over (data, fsdp); the rest replicated."""
    return {name: sharding.batch_sharding(mesh, value.ndim) for name, value in batch.items()}


def token_logprobs(graphdef: nnx.GraphDef, params: nnx.State, batch: dict) -> jax.Array:
    """`[rows, seq]` float32 log p(label) of every position of the packed rows."""
    model = nnx.merge(graphdef, params)
    # The mask goes in as per-token segments: the model builds it per attention block, or whole for dense attention.
    mask = TreeMask(batch["segment"], batch["visible_prefix"])
    hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], mask)
    return model.label_logprobs(hidden, batch["labels"])


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


def loss_sums(graphdef: nnx.GraphDef, objective: Objective, dpo: DPOConfig, params: nnx.State,
              ref_params: nnx.State | None, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss summed over targets, sums of `weight` (target tokens or pairs) and of the metrics) of one micro-batch."""
    logps = token_logprobs(graphdef, params, batch)
    sums = {"tokens": jnp.sum(batch["segment"] >= 0).astype(jnp.float32)}
    if objective == "sft":
        loss, sums["weight"] = losses.sft_loss(logps, batch["sft_weight"])
        return loss, sums
    # The reference log-probs are computed here, per micro-batch, with the frozen reference params rather than in a
    # separate pass before training: one extra forward (about a third of a training step's compute) costs less than
    # a full pass over the data plus storing and re-joining per-pair values with a shuffled, packed, resumable
    # stream, and it keeps every batch self-contained.
    ref_logps = jax.lax.stop_gradient(token_logprobs(graphdef, ref_params, batch))
    normalise = dpo.loss_type == "ipo"
    chosen, rejected = pair_logprobs(logps, batch, normalise)
    ref_chosen, ref_rejected = pair_logprobs(ref_logps, batch, normalise)
    loss, sums["weight"], metrics = losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, batch["pair_weight"],
                                                    dpo.beta, dpo.loss_type, dpo.label_smoothing)
    return loss, {**sums, **metrics}


def _split_micro_batches(batch: dict, micro_batches: int, mesh: Mesh) -> dict:
    """`[rows, ...]` → `[micro_batches, rows / micro_batches, ...]`, row r in micro-batch r % micro_batches.

    Strided rather than contiguous: rows are laid out contiguously over the devices, so a contiguous split would put
    each micro-batch on a fraction of the devices; strided, every device holds part of every micro-batch."""
    def split(x):
        x = x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)
        spec = PartitionSpec(None, sharding.BATCH_AXES, *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return {name: split(value) for name, value in batch.items()}


def make_grad_fn(graphdef: nnx.GraphDef, objective: Objective, dpo: DPOConfig, micro_batches: int,
                 mesh: Mesh) -> Callable:
    """`grad_fn(params, ref_params, batch) -> (grads, metrics)`: gradients of the batch's mean loss (per target
    token or pair of the *whole* batch), accumulated over micro-batches; metrics are batch means plus counts."""

    def micro_loss(params, ref_params, micro_batch):
        return loss_sums(graphdef, objective, dpo, params, ref_params, micro_batch)

    value_and_grad = jax.value_and_grad(micro_loss, has_aux=True)

    def grad_fn(params: nnx.State, ref_params: nnx.State | None, batch: dict):
        micro = _split_micro_batches(batch, micro_batches, mesh)

        def accumulate(carry, micro_batch):
            grads, totals = carry
            (loss, sums), micro_grads = value_and_grad(params, ref_params, micro_batch)
            totals = jax.tree.map(jnp.add, totals, {**sums, "loss": loss})
            return (jax.tree.map(jnp.add, grads, micro_grads), totals), None

        first = jax.tree.map(lambda x: x[0], micro)
        loss_shape, sums_shape = jax.eval_shape(micro_loss, params, ref_params, first)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), {**sums_shape, "loss": loss_shape})
        (grads, totals), _ = jax.lax.scan(accumulate, (jax.tree.map(jnp.zeros_like, params), zeros), micro)

        weight = jnp.maximum(totals.pop("weight"), 1.0)  # a batch without targets updates nothing (grads are 0)
        tokens = totals.pop("tokens")
        metrics = {name: value / weight for name, value in totals.items()}
        metrics.update(tokens=tokens, targets=weight)
        return jax.tree.map(lambda g: g / weight, grads), metrics

    return grad_fn


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    objective: Objective, dpo: DPOConfig, micro_batches: int, mesh: Mesh) -> Callable:
    """`step(state, batch, ref_params) -> (state, metrics)`, not yet jit-compiled (see `compile_train_step`)."""
    grad_fn = make_grad_fn(graphdef, objective, dpo, micro_batches, mesh)

    def step(state: TrainState, batch: dict, ref_params: nnx.State | None):
        grads, metrics = grad_fn(state.params, ref_params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng, _ = jax.random.split(state.rng)
        metrics.update(grad_norm=optax.global_norm(grads), lr=schedule(state.step))
        return TrainState(state.step + 1, params, opt_state, rng), metrics

    return step


def compile_train_step(step: Callable, shardings: TrainState, batch_example: dict, ref_shardings, mesh: Mesh):
    """`step` jit-compiled with explicit in/out shardings; the incoming state is donated (updated in place)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, in_shardings=(shardings, batch_shardings(batch_example, mesh), ref_shardings),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))
