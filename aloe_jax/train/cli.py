"""`aloe-jax sft`, `aloe-jax dpo` (train from a YAML config + key=value overrides) and `aloe-jax export`
(trainer checkpoint → HF folder)."""

from __future__ import annotations

import argparse

from aloe_jax.core.errors import ConfigError


def _train(args: argparse.Namespace) -> None:
    from aloe_jax.core.config import apply_overrides, build_config, read_yaml
    from aloe_jax.train.config import TrainConfig
    from aloe_jax.train.trainer import run

    data = read_yaml(args.config)
    declared = data.get("objective", args.command)
    if declared != args.command:
        raise ConfigError(f"config {args.config!r} is a {declared} config; run `aloe-jax {declared}` with it")
    data = apply_overrides(data, args.overrides)
    if data.get("objective", args.command) != args.command:
        raise ConfigError(f"objective={data['objective']} contradicts the command; run `aloe-jax {data['objective']}`")
    data["objective"] = args.command
    run(build_config(TrainConfig, data, source=repr(args.config)))


def _export(args: argparse.Namespace) -> None:
    from aloe_jax.core.errors import ModelLoadError
    from aloe_jax.models.loader import load_model
    from aloe_jax.models.weights import export_hf
    from aloe_jax.models.run_folder import resolve_checkpoint

    if resolve_checkpoint(args.checkpoint) is None:
        raise ModelLoadError(
            f"{args.checkpoint!r} is not a trainer run folder (no aloe_run.json): pass the run's output_dir, its "
            "checkpoints folder or one checkpoints/<step> folder"
        )
    model, tokenizer = load_model(args.checkpoint, param_dtype=args.dtype, dtype=args.dtype)
    export_hf(model, tokenizer, args.out)
    print(f"exported {args.checkpoint} to {args.out}", flush=True)


def register(commands) -> None:
    """Add the sft, dpo and export subcommands."""
    for name, what in (("sft", "supervised fine-tuning on preferred replies"),
                       ("dpo", "direct preference optimisation on preferred/rejected pairs")):
        parser = commands.add_parser(name, help=f"{what} (tree-packed, sharded, resumable)")
        parser.add_argument("--config", required=True, help=f"YAML config (local or gs://), e.g. configs/{name}.yaml")
        parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                            help="config overrides, e.g. optim.lr=2e-5 mesh.fsdp=4 output_dir=gs://bucket/run")
        parser.set_defaults(run=_train)
    export = commands.add_parser("export", help="write a trainer checkpoint's params as an HF model folder")
    export.add_argument("checkpoint", help="run folder, its checkpoints folder, or checkpoints/<step> (local or gs://)")
    export.add_argument("out", help="output HF folder (local or gs://)")
    export.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the exported weights (default float32)")
    export.set_defaults(run=_export)
