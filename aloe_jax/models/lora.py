"""LoRA adapters on the decoder's projections: `W x + (alpha / rank) · B A dropout(x)`, the base weights frozen.

An adapter is two `LoraParam`s beside the projection's weight in its module (`q_lora_a`, `q_lora_b`): A `[in...,
rank]` (random) and B `[rank, out...]` (zeros, so training starts at the base model). They carry the weight's logical
axes on their in / out side and "lora_rank" (unsharded) between, and in a scan_layers model a leading "layers" axis
like every stacked weight. Adapters are added to an already loaded model (`add_adapters`), so any source the loader
reads can be fine-tuned; `merged` folds them into the weights for export and evaluation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pydantic
from flax import nnx

from aloe_jax.core.config import StrictModel

# Projection name → (the module attribute path under a block, how many leading weight dims are its input).
PROJECTIONS: dict[str, tuple[str, int]] = {
    "q": ("attn", 1), "k": ("attn", 1), "v": ("attn", 1), "o": ("attn", 2),
    "gate": ("mlp", 1), "up": ("mlp", 1), "down": ("mlp", 1),
}
RANK_AXIS = "lora_rank"
_INIT_A = jax.nn.initializers.normal(stddev=0.02)


class LoraConfig(StrictModel):
    """`lora:` of a training run: adapters of `rank` on the `targets` projections, scaled by alpha / rank."""

    rank: int = pydantic.Field(8, gt=0)
    alpha: float = pydantic.Field(16.0, gt=0)
    targets: list[str] = ["q", "k", "v", "o", "gate", "up", "down"]  # the decoder's projection names
    dropout: float = pydantic.Field(0.0, ge=0, lt=1)  # on the adapter's input, in training steps only

    @pydantic.field_validator("targets")
    @classmethod
    def _known_targets(cls, targets: list[str]) -> list[str]:
        unknown = [t for t in targets if t not in PROJECTIONS]
        if unknown or not targets:
            raise ValueError(f"lora.targets {targets}: each must be one of {', '.join(PROJECTIONS)}")
        return list(dict.fromkeys(targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraParam(nnx.Param):
    """An adapter matrix: the only parameters a LoRA run trains."""


def _a_name(target: str) -> str:
    return f"{target}_lora_a"


def _b_name(target: str) -> str:
    return f"{target}_lora_b"


def has_adapter(module: nnx.Module, target: str) -> bool:
    return hasattr(module, _a_name(target))


def plus_delta(module: nnx.Module, target: str, x: jax.Array, y: jax.Array,
               dropout_key: jax.Array | None) -> jax.Array:
    """`y`, projection `target` of input `x`, plus its adapter's contribution (`y` itself without an adapter);
    dropout on the adapter's `x` when a key is given (training)."""
    if not has_adapter(module, target):
        return y
    a, b = getattr(module, _a_name(target))[...], getattr(module, _b_name(target))[...]
    rate = module.lora_dropout
    if dropout_key is not None and rate > 0:
        keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, list(PROJECTIONS).index(target)), 1 - rate,
                                    x.shape)
        x = jnp.where(keep, x / (1 - rate), 0).astype(x.dtype)
    low_rank = jnp.tensordot(x, a.astype(x.dtype), axes=a.ndim - 1)  # [..., rank]
    return y + jnp.tensordot(low_rank, b.astype(x.dtype), axes=1) * jnp.asarray(module.lora_scale, x.dtype)


def _blocks(model: nnx.Module) -> tuple[list[nnx.Module], bool]:
    """(the blocks of a decoder, whether they are one stacked block of a scan_layers model)."""
    if model.options.scan_layers:
        return [model.layers], True
    return list(model.layers), False


def add_adapters(model: nnx.Module, cfg: LoraConfig, rngs: nnx.Rngs) -> nnx.Module:
    """Add `cfg`'s adapters to a decoder in place (A random, B zeros: the model's outputs do not change)."""
    blocks, stacked = _blocks(model)
    for block in blocks:
        for target in cfg.targets:
            parent_name, in_dims = PROJECTIONS[target]
            module = getattr(block, parent_name)
            weight = getattr(module, target)
            axes = weight.get_metadata().get("logical_axes") or (None,) * weight.ndim
            lead = 1 if stacked else 0  # the "layers" axis of stacked weights
            shape, split = tuple(weight.shape), lead + in_dims
            a_shape = (*shape[:split], cfg.rank)
            b_shape = (*shape[:lead], cfg.rank, *shape[split:])
            a = _INIT_A(rngs.params(), a_shape, weight.dtype)
            b = jnp.zeros(b_shape, weight.dtype)
            setattr(module, _a_name(target), LoraParam(a, logical_axes=(*axes[:split], RANK_AXIS)))
            setattr(module, _b_name(target), LoraParam(b, logical_axes=(*axes[:lead], RANK_AXIS, *axes[split:])))
            module.lora_scale, module.lora_dropout = cfg.scale, cfg.dropout
    return model


def config_of(model: nnx.Module) -> LoraConfig | None:
    """The LoRA config of a decoder's adapters (rank, alpha, targets, dropout), or None without adapters."""
    block = _blocks(model)[0][0]
    targets = [t for t, (parent, _) in PROJECTIONS.items() if has_adapter(getattr(block, parent), t)]
    if not targets:
        return None
    module = getattr(block, PROJECTIONS[targets[0]][0])
    rank = getattr(module, _a_name(targets[0])).shape[-1]
    return LoraConfig(rank=rank, alpha=module.lora_scale * rank, targets=targets, dropout=module.lora_dropout)


def num_adapter_params(params: nnx.State) -> int:
    """How many numbers the adapters of a parameter state hold."""
    return sum(x.size for x in jax.tree.leaves(nnx.filter_state(params, LoraParam)))


def adapter_off(params: nnx.State) -> nnx.State:
    """`params` with every B zeroed: the base model's outputs from the same base weights (no copy of them)."""
    return nnx.from_flat_state([(path, v.replace(jnp.zeros_like(v[...])) if str(path[-1]).endswith("_lora_b") else v)
                                for path, v in nnx.to_flat_state(params)])


def merged_weight(weight: jax.Array, a: jax.Array, b: jax.Array, scale: float, stacked: bool) -> jax.Array:
    """`weight + scale · A B` (`[in..., out...]`), per layer for stacked weights."""
    product = lambda a1, b1: jnp.tensordot(a1, b1, axes=1)  # noqa: E731
    ab = jax.vmap(product)(a, b) if stacked else product(a, b)
    return (weight.astype(jnp.float32) + scale * ab.astype(jnp.float32)).astype(weight.dtype)


def merged(model: nnx.Module) -> nnx.Module:
    """The decoder with its adapters folded into the weights and removed (in place); a model without adapters is
    returned as it is."""
    blocks, stacked = _blocks(model)
    for block in blocks:
        for target, (parent_name, _) in PROJECTIONS.items():
            module = getattr(block, parent_name)
            if not has_adapter(module, target):
                continue
            a, b = getattr(module, _a_name(target))[...], getattr(module, _b_name(target))[...]
            weight = getattr(module, target)
            weight[...] = merged_weight(weight[...], a, b, module.lora_scale, stacked)
            delattr(module, _a_name(target))
            delattr(module, _b_name(target))
    return model
