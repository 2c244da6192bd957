"""TPU slices by their Cloud names (`v5p-8`, `v5e-16`, ...) as libtpu topologies whose devices XLA compiles for on a
machine without TPUs (`jax.experimental.topologies` gives compile-only devices).

v4-N and v5p-N count TensorCores (two per chip: N/2 chips, in 3-D shapes); v5e-N and v6e-N count chips (2-D). Hosts
hold 4 chips (2x2x1), except the single-host v5e/v6e slices of 1 and 8 chips: libtpu's default host bounds (2x2x1)
would reject the 1-chip slice and split the 8-chip one over two processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
from typing import Iterator

from aloe_jax.core.errors import AloeError

INSTALL_HINT = "pip install -e .[tpu]"


@dataclasses.dataclass(frozen=True)
class Slice:
    """One TPU slice: its Cloud name, libtpu topology and host layout, and the chip's nominal HBM bandwidth."""

    name: str  # e.g. "v5p-64"
    topology: str  # e.g. "v5p:2x4x4"
    chips: int
    chips_per_host: tuple[int, int, int]
    hbm_bytes_per_s: float  # per chip (Cloud TPU documentation)
    chip_config: str | None = None  # libtpu chip_config_name: "megacore" makes a v4 chip one device, not two

    def options(self) -> dict:
        """Keyword options of `get_topology_desc` beyond the topology name."""
        options = dict(chips_per_host_bounds=self.chips_per_host)
        if self.chip_config:
            options["chip_config_name"] = self.chip_config
        return options


# chips → shape of the slices that Cloud TPU offers (v5p / v4: https://cloud.google.com/tpu/docs/v5p).
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SINGLE_HOST_2D = {1: (1, 1, 1), 8: (2, 4, 1)}
_FOUR_CHIP_HOST = (2, 2, 1)


def _slices() -> dict[str, Slice]:
    slices = {}
    for gen, bandwidth, chip_config in (("v5p", 2765e9, None), ("v4", 1200e9, "megacore")):
        for chips, shape in _SHAPES_3D.items():
            name = f"{gen}-{2 * chips}"
            slices[name] = Slice(name, f"{gen}:{shape}", chips, _FOUR_CHIP_HOST, bandwidth, chip_config)
    for gen, bandwidth in (("v5e", 819e9), ("v6e", 1640e9)):
        for chips, shape in _SHAPES_2D.items():
            name = f"{gen}-{chips}"
            slices[name] = Slice(name, f"{gen}:{shape}", chips, _SINGLE_HOST_2D.get(chips, _FOUR_CHIP_HOST), bandwidth)
    return slices


SLICES: dict[str, Slice] = _slices()


def known_names() -> str:
    """The known slice names, one generation per group: `v5p-8 … v5p-512; v4-8 …`."""
    groups: dict[str, list[str]] = {}
    for name in SLICES:
        groups.setdefault(name.split("-")[0], []).append(name)
    return "; ".join(", ".join(names) for names in groups.values())


def get_slice(name: str) -> Slice:
    """The slice of a Cloud name such as `v5p-8`."""
    if name not in SLICES:
        raise AloeError(f"unknown topology {name!r}; known: {known_names()}")
    return SLICES[name]


@contextlib.contextmanager
def _quiet_libtpu(slice_: Slice) -> Iterator[None]:
    """Environment for loading libtpu without a TPU, restored afterwards. Without an accelerator type and worker
    list libtpu logs warnings and an INVALID_ARGUMENT line (harmless for compiling); without
    ALLOW_MULTIPLE_LIBTPU_LOAD, another process that loaded libtpu (any JAX process probing for a TPU) holds its
    lockfile and the topology fails with ABORTED."""
    wanted = {"TPU_ACCELERATOR_TYPE": slice_.name, "TPU_WORKER_HOSTNAMES": "localhost",
              "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    saved = {key: os.environ.get(key) for key in wanted}
    os.environ.update({key: value for key, value in wanted.items() if saved[key] is None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def libtpu_installed() -> bool:
    """Whether libtpu (the TPU compiler) is importable."""
    return importlib.util.find_spec("libtpu") is not None


def slice_devices(slice_: Slice) -> list:
    """The compile-only devices of the slice, one per chip, in libtpu's order."""
    if not libtpu_installed():
        raise AloeError(f"compiling for a TPU topology needs libtpu, which is not installed: {INSTALL_HINT}")
    import jax
    from jax.experimental import topologies

    with _quiet_libtpu(slice_):
        try:
            devices = topologies.get_topology_desc(topology_name=slice_.topology, platform="tpu",
                                                   **slice_.options()).devices
        except jax.errors.JaxRuntimeError as err:
            raise AloeError(f"libtpu cannot describe {slice_.name} ({slice_.topology}): {first_line(err)}") from None
    if len(devices) != slice_.chips:
        raise AloeError(f"libtpu describes {slice_.name} ({slice_.topology}) as {len(devices)} devices, "
                        f"expected {slice_.chips} chips")
    return list(devices)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
_SIZE = r"([\d.]+)\s*([KMGTP]?)i?B?"
# XLA:TPU's two ways of refusing a program that does not fit in HBM.
_OUT_OF_HBM = (re.compile(rf"\({_SIZE}\) exceeds available HBM \({_SIZE}\)"),
               re.compile(rf"Used {_SIZE} of {_SIZE} hbm"))


def out_of_memory(message: str) -> tuple[float, float] | None:
    """(bytes required, bytes available) from XLA:TPU's RESOURCE_EXHAUSTED message, or None if it is not one."""
    if "RESOURCE_EXHAUSTED" not in message:
        return None
    for pattern in _OUT_OF_HBM:
        found = pattern.search(message)
        if found:
            need, need_unit, have, have_unit = found.groups()
            return float(need) * _UNITS[need_unit], float(have) * _UNITS[have_unit]
    return None


def hbm_bytes(device) -> float:
    """HBM per chip as the TPU compiler counts it (e.g. 95.74 GiB of a v5p's 95 GB, after its reservations): read
    from its refusal of a program 1 TiB too large, since compile-only devices have no memory stats."""
    import jax
    import jax.numpy as jnp

    on_chip = jax.sharding.SingleDeviceSharding(device)
    too_big = jax.ShapeDtypeStruct((2**40,), jnp.int8, sharding=on_chip)
    try:
        jax.jit(lambda x: x + 1, out_shardings=on_chip).lower(too_big).compile()
    except jax.errors.JaxRuntimeError as err:
        sizes = out_of_memory(str(err))
        if sizes:
            return sizes[1]
        raise AloeError(f"cannot read the HBM size of a {device.device_kind} from libtpu: {first_line(err)}") from None
    raise AloeError(f"libtpu compiled a 1 TiB program for one {device.device_kind}: cannot tell its HBM size")
