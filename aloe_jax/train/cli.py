"""`aloe-jax sft`, `aloe-jax dpo` (train from a YAML config + key=value overrides) and `aloe-jax export`
(trainer checkpoint → HF folder)."""

from __future__ import annotations

import argparse

from aloe_jax.core import storage
from aloe_jax.core.cli_args import Alias, add_config_args, command_overrides, load_command_config, printed_config
from aloe_jax.core.errors import ConfigError, ModelLoadError

DTYPES = ("float32", "bfloat16")
TRAIN_ALIASES = (
    Alias("--model", "model.path", "starting model: HF folder (local or gs://), trainer run folder or smollm2-135m"),
    Alias("--dtype", "model.dtype", "dtype of activations and matmuls (master weights: model.param_dtype)",
          choices=DTYPES),
    Alias("--out", "output_dir", "run folder (local or gs://); rerunning with it resumes"),
)
EXPORT_ALIASES = (
    Alias("checkpoint", "model.path", "run folder, its checkpoints folder, or checkpoints/<step> (local or gs://)"),
    Alias("out", "output_dir", "output HF folder (local or gs://)"),
    Alias("--dtype", "model.dtype", "dtype of the exported weights", choices=DTYPES),
    Alias("--adapter", "adapter", "a LoRA run's adapters only, as a PEFT adapter folder (default: merged weights)",
          const=True),
)


def _train(args: argparse.Namespace) -> None:
    from aloe_jax.train.config import TrainConfig

    cfg = load_command_config(TrainConfig, args)
    # A config (or override) that names the other objective is a mistake; one that names none runs this command's.
    if "objective" in cfg.model_fields_set and cfg.objective != args.command:
        if any(o.startswith("objective=") for o in command_overrides(args)):
            raise ConfigError(f"objective={cfg.objective} contradicts the command; run `aloe-jax {cfg.objective}`")
        raise ConfigError(f"config {args.config!r} is a {cfg.objective} config; run `aloe-jax {cfg.objective}` with it")
    cfg.objective = args.command
    if printed_config(cfg, args):
        return
    storage.require_writable_folder(cfg.output_dir)
    from aloe_jax.train.trainer import run

    run(cfg)


def _export(args: argparse.Namespace) -> None:
    from aloe_jax.train.config import ExportConfig

    cfg = load_command_config(ExportConfig, args)
    if printed_config(cfg, args):
        return
    from aloe_jax.models.loader import load_model
    from aloe_jax.models.run_folder import read_run_info, resolve_checkpoint
    from aloe_jax.models.weights import export_hf, export_peft

    if not cfg.model.path or cfg.output_dir is None:
        raise ConfigError("export needs a trainer run folder and an output folder: export RUN OUT")
    if resolve_checkpoint(cfg.model.path) is None:
        raise ModelLoadError(
            f"{cfg.model.path!r} is not a trainer run folder (no aloe_run.json): pass the run's output_dir, its "
            "checkpoints folder or one checkpoints/<step> folder"
        )
    run_info = read_run_info(resolve_checkpoint(cfg.model.path)[0])
    if cfg.adapter and not run_info.get("lora"):
        raise ConfigError(f"{cfg.model.path!r} is not a LoRA run (no lora in its config): export it without --adapter")
    model, tokenizer = load_model(cfg.model.path, param_dtype=cfg.model.dtype, dtype=cfg.model.dtype,
                                  merge_lora=not cfg.adapter)
    if cfg.adapter:
        export_peft(model, cfg.output_dir, run_info["base_model"])
    else:
        export_hf(model, tokenizer, cfg.output_dir)
    print(f"exported {cfg.model.path} to {cfg.output_dir}{' (LoRA adapter)' if cfg.adapter else ''}", flush=True)


def register(commands) -> None:
    """Add the sft, dpo and export subcommands."""
    for name, what in (("sft", "supervised fine-tuning on preferred replies"),
                       ("dpo", "direct preference optimisation on preferred/rejected pairs")):
        parser = commands.add_parser(name, help=f"{what} (tree-packed, sharded, resumable)")
        add_config_args(parser, name, TRAIN_ALIASES)
        parser.set_defaults(run=_train)
    export = commands.add_parser("export", help="write a trainer checkpoint's params as an HF model folder (or a "
                                 "LoRA run's adapters as a PEFT adapter folder)")
    add_config_args(export, None, EXPORT_ALIASES)
    export.set_defaults(run=_export)
