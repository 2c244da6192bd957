"""`aloe-jax compile`: compile a run's programs for a TPU slice on this machine (no TPU needed) and report memory per
chip against HBM, FLOPs and a roofline bound. Exit 0 when every program fits, 1 when one does not, 2 on a user error."""

from __future__ import annotations

import argparse

from aloe_jax.aot.topologies import INSTALL_HINT, known_names
from aloe_jax.core.cli_args import Alias, add_config_args, command_overrides, printed_config
from aloe_jax.core.errors import ConfigError
from aloe_jax.models.presets import HF_PRESETS

EXIT_DOES_NOT_FIT = 1
ARCH_PREFIX = "arch."  # overrides of the architecture's sizes rather than of the config
_EVAL_KEYS = ("cases", "turns", "simulator", "judge")
COMPILE_ALIASES = (Alias("--model", "model.path", "model whose architecture is compiled (its weights are not read)"),)


def load_run_config(config: str, overrides: list[str]):
    """The TrainConfig, RLConfig or EvalConfig in a YAML file or packaged config (with `base:` and key=value
    overrides), told apart by its keys (an RL config: objective grpo or a rollout section)."""
    from aloe_jax.core.config import apply_overrides, build_config, read_yaml
    from aloe_jax.eval.config import EvalConfig
    from aloe_jax.rl.config import RLConfig
    from aloe_jax.train.config import TrainConfig

    data = apply_overrides(read_yaml(config), overrides)
    if data.get("objective") == "grpo" or "rollout" in data:
        return build_config(RLConfig, data, source=repr(config))
    if "objective" in data or "data" in data:
        return build_config(TrainConfig, data, source=repr(config))
    if any(key in data for key in _EVAL_KEYS):
        return build_config(EvalConfig, data, source=repr(config))
    raise ConfigError(f"config {config!r} is neither a train config (objective, data, ...: configs/sft.yaml), an RL "
                      f"config (objective grpo, rollout, ...: configs/rl.yaml) nor an eval config "
                      f"({', '.join(_EVAL_KEYS)}, ...: configs/eval.yaml)")


def _compile_only_on_tpu() -> None:
    """Keep every eager computation on the CPU: the TPUs exist only for the compiler. Done before JAX picks its
    backends (afterwards the setting is moot: a process that already runs on CPU devices keeps them)."""
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")


def _cmd_compile(args: argparse.Namespace) -> int:
    from aloe_jax.train.config import TrainConfig

    overrides = command_overrides(args)
    sizes = [o[len(ARCH_PREFIX):] for o in overrides if o.startswith(ARCH_PREFIX)]
    cfg = load_run_config(args.config, [o for o in overrides if not o.startswith(ARCH_PREFIX)])
    if printed_config(cfg, args):
        return 0
    if args.topology is None:
        raise ConfigError("compile needs the TPU slice to compile for: --topology NAME, e.g. --topology v5p-8")
    _compile_only_on_tpu()
    import jax

    from aloe_jax.aot import analysis, programs, topologies

    slice_ = topologies.get_slice(args.topology)
    devices = topologies.slice_devices(slice_)
    dtype = cfg.model.dtype
    param_dtype = cfg.model.param_dtype if isinstance(cfg, TrainConfig) else dtype
    spec, dtypes = cfg.model.path, dict(param_dtype=param_dtype, dtype=dtype)
    model_cfg, source = programs.resolve_architecture(spec, dtypes, args.preset, args.config, sizes)
    described = f"{model_cfg.architecture} ({model_cfg.num_params():.3g} parameters) from {source}"
    build = programs.train_program if isinstance(cfg, TrainConfig) else programs.generate_program
    to_compile = [build(cfg, model_cfg, devices)]
    hbm = topologies.hbm_bytes(devices[0])
    # The persistent compilation cache cannot hold compile-only executables (reading one back fails): keep it out.
    cache_enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        reports = []
        for program in to_compile:
            reports.append(analysis.analyse(program, slice_, devices, hbm, described, args.config))
            print(reports[-1].json() if args.json else reports[-1].text(), flush=True)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_enabled)
    return 0 if all(r.fits for r in reports) else EXIT_DOES_NOT_FIT


def register(commands) -> None:
    """Add the `compile` subcommand."""
    parser = commands.add_parser(
        "compile", help="compile a run's programs for a TPU slice without a TPU: memory per chip, FLOPs, roofline",
        description="Compile the programs a config runs (train config: its SFT/DPO step; RL config: its GRPO step "
                    "on the packed rollout rows; eval config: the model "
                    "under test's generation) for a TPU slice with libtpu's compiler, on this machine, from shapes "
                    "alone (no weights read). Per program: bytes per chip against HBM, FLOPs, compile time and a "
                    "roofline ceiling on tokens/s and MFU. Exit 0 when all fit, 1 when one does not.",
        epilog=f"topologies (v4-N and v5p-N have N/2 chips, v5e-N and v6e-N N chips): {known_names()}. "
               f"Needs libtpu: {INSTALL_HINT}.")
    # The flags below are how to compile, not what: they set no key of the train or eval config.
    parser.add_argument("--topology", default=None, metavar="NAME",
                        help="TPU slice, e.g. v5p-8, v5p-64, v5e-16, v6e-8 (all below)")
    parser.add_argument("--preset", default=None, choices=sorted(HF_PRESETS),
                        help="architecture to use instead of the config's model (a gs:// model, which is not read, is "
                             "matched to a preset by its name when this is not given)")
    parser.add_argument("--json", action="store_true", help="one JSON object per program per line")
    # A train or eval config, e.g. runs/llama3-8b-sft-v5p-8 or eval; overrides may also be arch.FIELD=N, which
    # resizes the architecture (a size field of ModelConfig) to try a smaller variant, e.g. arch.num_layers=2.
    add_config_args(parser, "sft", COMPILE_ALIASES)
    parser.set_defaults(run=_cmd_compile)

