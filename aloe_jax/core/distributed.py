"""Multi-process start-up: join the other processes of a job before anything touches a device.

Three cases, checked in order:
- `ALOE_JAX_COORDINATOR`, `ALOE_JAX_NUM_PROCESSES`, `ALOE_JAX_PROCESS_ID` set (our launcher, tests on loopback):
  join that coordinator explicitly; on CPU the cross-process collectives go through gloo.
- a Cloud TPU VM (TPU device files present): `jax.distributed.initialize()` discovers the slice's workers itself.
- otherwise a single process: nothing to do.

`cpu_only_without_accelerators` picks the backend of a host without accelerators before JAX starts one.
"""

from __future__ import annotations

import glob
import os
import sys

from aloe_jax.core.errors import ConfigError

ENV_COORDINATOR = "ALOE_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "ALOE_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "ALOE_JAX_PROCESS_ID"
_ENV = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)

_initialized = False


def _int_env(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ConfigError(f"environment variable {name}={os.environ[name]!r} must be an integer") from None


# TPU VMs expose their chips as /dev/accel* (v4, v5p) or VFIO groups (v5e, v6e); NVIDIA and AMD GPUs their own files.
TPU_DEVICE_FILES = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")
GPU_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/kfd")


def _any_file(patterns: tuple[str, ...]) -> bool:
    return any(glob.glob(pattern) for pattern in patterns)


def _on_tpu_vm() -> bool:
    return _any_file(TPU_DEVICE_FILES)


def cpu_only_without_accelerators(command: str) -> None:
    """On a host with no TPU or GPU device files, run JAX on its CPU backend only: the libtpu we install for
    `aloe-jax compile` otherwise probes for a TPU at start-up and prints screens of "could not determine TPU
    accelerator type" warnings into every log. `compile` keeps the TPU plugin (it builds TPU programs on this CPU)
    and a JAX_PLATFORMS the user set wins."""
    if command == "compile" or "JAX_PLATFORMS" in os.environ or _any_file(TPU_DEVICE_FILES + GPU_DEVICE_FILES):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # JAX reads the variable when it is imported; a command module may have imported it
        sys.modules["jax"].config.update("jax_platforms", "cpu")


def maybe_initialize() -> bool:
    """Join a multi-process job when the environment describes one; returns True when JAX runs distributed."""
    global _initialized
    if _initialized:
        return True
    import jax

    present = [name for name in _ENV if os.environ.get(name)]
    if present:
        if len(present) != len(_ENV):
            missing = ", ".join(name for name in _ENV if name not in present)
            raise ConfigError(f"multi-process run: {', '.join(present)} set but {missing} missing; set all three")
        num_processes, process_id = _int_env(ENV_NUM_PROCESSES), _int_env(ENV_PROCESS_ID)
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"{ENV_PROCESS_ID}={process_id} must be in 0..{num_processes - 1} "
                              f"({ENV_NUM_PROCESSES}={num_processes})")
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _on_tpu_vm():
            # CPU devices of different processes can only talk through a collectives library; gloo ships with jaxlib.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=os.environ[ENV_COORDINATOR], num_processes=num_processes,
                                   process_id=process_id)
    elif _on_tpu_vm():
        jax.distributed.initialize()
    else:
        return False
    _initialized = True
    return True
