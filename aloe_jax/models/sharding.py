"""Named device mesh (`data`, `fsdp`, `tensor`) and the rules that place parameters on it by their logical axes.

Every parameter carries `logical_axes` metadata (e.g. `("embed", "mlp")`); a rule table maps each logical axis to a
mesh axis. A dimension that the mesh axis does not divide (SmolLM2's 3 KV heads on a tensor axis of 2) is
replicated instead of failing, so one rule table serves every model size.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aloe_jax.core.config import StrictModel
from aloe_jax.core.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical parameter axis → mesh axis. FSDP shards the model dimension; tensor parallelism shards heads, MLP and vocab.
DEFAULT_RULES: dict[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "layers": None,  # the stacked layer axis of a scan_layers model: every device holds its share of every layer
    "lora_rank": None,  # a LoRA adapter's rank: a few numbers per row, split only along the weight's own axes
}


class MeshConfig(StrictModel):
    """Mesh shape; one axis may be -1 to take all remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """The concrete (data, fsdp, tensor) sizes for `num_devices` devices."""
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ConfigError("mesh: at most one of data/fsdp/tensor may be -1")
        if any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"mesh: sizes must be positive or -1, got {sizes}")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ConfigError(f"mesh {sizes}: {num_devices} devices are not divisible by {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ConfigError(
                f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {math.prod(sizes)} devices, "
                f"but {num_devices} are available"
            )
        return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: list | None = None) -> Mesh:
    """A mesh over all (or the given) devices with axes (data, fsdp, tensor), in Auto sharding mode."""
    devices = devices if devices is not None else jax.devices()
    shape = cfg.shape(len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices is jax.devices() or len(devices) == jax.device_count():
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def partition_spec(
    logical_axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, rules: dict[str, str | None] = DEFAULT_RULES
) -> PartitionSpec:
    """The PartitionSpec for one parameter: its logical axes mapped by `rules`, replicating non-dividing dims."""
    used: set[str] = set()
    spec = []
    for axis, dim in zip(logical_axes, shape):
        mesh_axis = rules.get(axis) if axis else None
        if mesh_axis is None or mesh_axis in used or dim % mesh.shape[mesh_axis]:
            spec.append(None)
            continue
        used.add(mesh_axis)
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def param_shardings(
    model: nnx.Module, mesh: Mesh, rules: dict[str, str | None] = DEFAULT_RULES
) -> Callable[[tuple], NamedSharding]:
    """A function from a parameter's state path to its NamedSharding (works on abstract models too)."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))

    def sharding_of(path: tuple) -> NamedSharding:
        variable = flat[path]
        axes = variable.get_metadata().get("logical_axes") or (None,) * len(variable.shape)
        return NamedSharding(mesh, partition_spec(axes, tuple(variable.shape), mesh, rules))

    return sharding_of


def param_state_shardings(model: nnx.Module, mesh: Mesh,
                          rules: dict[str, str | None] = DEFAULT_RULES) -> nnx.State:
    """The model's parameter state with every leaf replaced by its NamedSharding (for jit in/out_shardings)."""
    sharding_of = param_shardings(model, mesh, rules)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return nnx.from_flat_state([(path, variable.replace(sharding_of(path))) for path, variable in flat])


def shard_model(model: nnx.Module, mesh: Mesh, rules: dict[str, str | None] = DEFAULT_RULES) -> nnx.Module:
    """Place every parameter of `model` on `mesh` according to `rules` (in place); returns the model."""
    sharding_of = param_shardings(model, mesh, rules)
    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    placed = [(path, variable.replace(jax.device_put(variable[...], sharding_of(path)))) for path, variable in flat]
    nnx.update(model, nnx.from_flat_state(placed))
    return model


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding for a `[batch, ...]` array: batch split over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))
