"""The jit-compiled optimizer step shared by every objective, with explicit shardings over the (data, fsdp, tensor)
mesh.

A step takes one global batch (the objective's fields of the `collate` dict of aloe_jax/train/inputs/batch.py, rows
split over data×fsdp), splits it into micro-batches, and accumulates *unnormalised* gradients (loss sums) over them in
a `lax.scan`. Only after the last micro-batch are gradients and loss divided by the objective's total weight (target
tokens for SFT, pairs for DPO) of the whole batch, so accumulating over k micro-batches gives the same update as one
k-times larger batch — dividing per micro-batch would over-weight micro-batches with few targets.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aloe_jax.models import sharding
from aloe_jax.train.objectives import Objective


class TrainState(NamedTuple):
    """Everything an optimizer step updates (and a checkpoint holds, besides the data iterator)."""

    step: jax.Array  # int32 []: optimizer steps taken
    params: nnx.State  # master weights (param_dtype)
    opt_state: optax.OptState
    rng: jax.Array  # uint32 [2]: split once per step, so any stochastic part of a step resumes exactly


def split_trainable(params: nnx.State, trainable: nnx.filterlib.Filter | None) -> tuple[nnx.State, nnx.State | None]:
    """(the parameters the optimizer updates, the frozen rest or None when every parameter trains)."""
    if trainable is None:
        return params, None
    return nnx.split_state(params, trainable, ...)


def join_trainable(trainable: nnx.State, frozen: nnx.State | None) -> nnx.State:
    """The inverse of `split_trainable`."""
    return trainable if frozen is None else nnx.merge_state(trainable, frozen)


def init_state(params: nnx.State, tx: optax.GradientTransformation, seed: int,
               trainable: nnx.filterlib.Filter | None = None) -> TrainState:
    """Step 0: fresh optimizer state for the `trainable` part of `params` (all when None) — a frozen base gets none;
    `params` is shared, so do not donate it elsewhere."""
    opt_state = tx.init(split_trainable(params, trainable)[0])
    return TrainState(jnp.zeros((), jnp.int32), params, opt_state, jax.random.PRNGKey(seed))


def train_state_shardings(params_shardings: nnx.State, abstract_state: TrainState,
                          tx: optax.GradientTransformation, mesh: Mesh,
                          trainable: nnx.filterlib.Filter | None = None) -> TrainState:
    """Shardings of a TrainState: optimizer moments like their (trainable) parameters, counters replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state,
                                split_trainable(params_shardings, trainable)[0],
                                transform_non_params=lambda _: replicated)
    return TrainState(replicated, params_shardings, opt, replicated)


def batch_shardings(batch: dict, mesh: Mesh) -> dict:
    """Rows of every batch field split over (data, fsdp); the rest replicated."""
    return {name: sharding.batch_sharding(mesh, value.ndim) for name, value in batch.items()}


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What every step function of a run is built from: the model's graph, the objective, how a global batch is
    split (micro-batches) and placed (mesh), which parameters train (a filter; None = all) and whether training
    steps draw dropout keys (LoRA dropout)."""

    graphdef: nnx.GraphDef
    objective: Objective
    micro_batches: int
    mesh: Mesh
    trainable: nnx.filterlib.Filter | None = None
    dropout: bool = False


def micro_batch_sums(ctx: StepContext, params: nnx.State, ref_params: nnx.State | None, batch: dict,
                     dropout_key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(the objective's loss sum, its weight and metric sums plus the count of real `tokens`) of one micro-batch."""
    loss, sums = ctx.objective.loss_sums(ctx.graphdef, params, ref_params, batch, dropout_key)
    return loss, {**sums, "tokens": jnp.sum(batch["segment"] >= 0).astype(jnp.float32)}


def batch_means(totals: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The loss and metrics of summed `totals` (from `micro_batch_sums`) divided by their weight, with the counts of
    `tokens` and `targets` (the weight) beside them."""
    metrics = dict(totals)
    weight = jnp.maximum(metrics.pop("weight"), 1.0)  # a batch without targets updates nothing (grads are 0)
    tokens = metrics.pop("tokens")
    return {**{name: value / weight for name, value in metrics.items()}, "tokens": tokens, "targets": weight}


def _split_micro_batches(batch: dict, micro_batches: int, mesh: Mesh) -> dict:
    """`[rows, ...]` → `[micro_batches, rows / micro_batches, ...]`, row r in micro-batch r % micro_batches.

    Strided rather than contiguous: rows are laid out contiguously over the devices, so a contiguous split would put
    each micro-batch on a fraction of the devices; strided, every device holds part of every micro-batch."""
    def split(x):
        x = x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)
        spec = PartitionSpec(None, sharding.BATCH_AXES, *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return {name: split(value) for name, value in batch.items()}


def _micro_batch_totals(ctx: StepContext, sums_of: Callable, zeros, batch: dict, keys: jax.Array | None = None):
    """`sums_of(micro_batch, key)` added up over the micro-batches of `batch` (one of `keys` each, or None),
    starting from `zeros` (its tree shape)."""
    micro = _split_micro_batches(batch, ctx.micro_batches, ctx.mesh)

    def accumulate(totals, xs):
        return jax.tree.map(jnp.add, totals, sums_of(*xs)), None

    return jax.lax.scan(accumulate, zeros, (micro, keys))[0]


def _zero_sums(ctx: StepContext, params: nnx.State, ref_params: nnx.State | None, batch: dict) -> dict:
    """Float32 zeros shaped like the totals of `micro_batch_sums`, the loss under "loss"."""
    first = jax.tree.map(lambda x: x[:x.shape[0] // ctx.micro_batches], batch)
    loss_shape, sums_shape = jax.eval_shape(lambda p, r, b: micro_batch_sums(ctx, p, r, b), params, ref_params, first)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), {**sums_shape, "loss": loss_shape})


def make_grad_fn(ctx: StepContext) -> Callable:
    """`grad_fn(params, ref_params, batch, rng=None) -> (grads, metrics)`: gradients of the batch's mean loss (per
    target token or pair of the *whole* batch) with respect to the trainable params, accumulated over micro-batches;
    metrics are batch means plus counts. `rng` seeds dropout when `ctx.dropout`."""
    value_and_grad = jax.value_and_grad(
        lambda t, f, r, b, k: micro_batch_sums(ctx, join_trainable(t, f), r, b, k), has_aux=True)

    def grad_fn(params: nnx.State, ref_params: nnx.State | None, batch: dict, rng: jax.Array | None = None):
        trainable, frozen = split_trainable(params, ctx.trainable)
        keys = jax.random.split(rng, ctx.micro_batches) if ctx.dropout and rng is not None else None

        def sums_of(micro_batch, key):
            (loss, sums), grads = value_and_grad(trainable, frozen, ref_params, micro_batch, key)
            return grads, {**sums, "loss": loss}

        zeros = (jax.tree.map(jnp.zeros_like, trainable), _zero_sums(ctx, params, ref_params, batch))
        grads, totals = _micro_batch_totals(ctx, sums_of, zeros, batch, keys)
        metrics = batch_means(totals)
        return jax.tree.map(lambda g: g / metrics["targets"], grads), metrics

    return grad_fn


def make_loss_sums_fn(ctx: StepContext) -> Callable:
    """`loss_sums_fn(params, ref_params, batch) -> totals`: the loss and metric sums of a global batch (no
    gradients), micro-batched as training is; add totals of several batches up, then `batch_means` them."""

    def loss_sums_fn(params: nnx.State, ref_params: nnx.State | None, batch: dict) -> dict:
        def sums_of(micro_batch, _):
            loss, sums = micro_batch_sums(ctx, params, ref_params, micro_batch)
            return {**sums, "loss": loss}

        return _micro_batch_totals(ctx, sums_of, _zero_sums(ctx, params, ref_params, batch), batch)

    return loss_sums_fn


def make_label_logprobs_fn(ctx: StepContext) -> Callable:
    """`label_logprobs_fn(params, batch) -> [rows, seq]` float32 label log-probs of a global batch (no gradients),
    computed micro-batch by micro-batch as training is (so it fits wherever a step does)."""
    from aloe_jax.train.objectives import batch_label_logprobs

    def label_logprobs_fn(params: nnx.State, batch: dict) -> jax.Array:
        micro = _split_micro_batches(batch, ctx.micro_batches, ctx.mesh)
        out = jax.lax.map(lambda b: batch_label_logprobs(ctx.graphdef, params, b), micro)  # [micro, rows/m, seq]
        return out.swapaxes(0, 1).reshape(-1, out.shape[-1])  # back to row order (the split was strided)

    return label_logprobs_fn


def make_train_step(ctx: StepContext, tx: optax.GradientTransformation, schedule: optax.Schedule) -> Callable:
    """`step(state, batch, ref_params) -> (state, metrics)`, not yet jit-compiled (see `compile_train_step`)."""
    grad_fn = make_grad_fn(ctx)

    def step(state: TrainState, batch: dict, ref_params: nnx.State | None):
        rng, dropout_rng = jax.random.split(state.rng)
        grads, metrics = grad_fn(state.params, ref_params, batch, dropout_rng)
        trainable, frozen = split_trainable(state.params, ctx.trainable)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        params = join_trainable(optax.apply_updates(trainable, updates), frozen)
        metrics.update(grad_norm=optax.global_norm(grads), lr=schedule(state.step))
        return TrainState(state.step + 1, params, opt_state, rng), metrics

    return step


def compile_train_step(step: Callable, shardings: TrainState, batch_example: dict, ref_shardings, mesh: Mesh):
    """`step` jit-compiled with explicit in/out shardings; the incoming state is donated (updated in place)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, in_shardings=(shardings, batch_shardings(batch_example, mesh), ref_shardings),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))
