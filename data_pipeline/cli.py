"""Subcommands of data generation: `personas`, `trees`, `export-trees`, `contamination` (registered in aloe_jax/cli.py).
Heavy imports (jax, datasets, tfds) stay inside the commands so `aloe-jax --help` is instant."""

from __future__ import annotations

import argparse
import pathlib

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "datagen.yaml"


def _load(args: argparse.Namespace):
    from aloe_jax.core.config import load_config
    from data_pipeline.config import DatagenConfig

    return load_config(DatagenConfig, args.config, args.overrides)


def _print_usage(meter) -> None:
    if meter.by_role:
        print("usage per role:\n" + meter.table())


def _cmd_personas(args: argparse.Namespace) -> None:
    from aloe_jax.llm.cache import CallCache
    from aloe_jax.llm.roles import Role, make_backend
    from aloe_jax.llm.usage import UsageMeter
    from data_pipeline import personas
    from data_pipeline.embeddings import SentenceEncoder

    cfg = _load(args)
    if args.kind:
        cfg.personas.kind = args.kind
    meter = UsageMeter(cfg.prices)
    cache = CallCache(cfg.cache)
    try:
        generator = Role("persona_generator", make_backend(cfg.roles.persona_generator.backend), cache, meter)
        report = personas.grow_pool(cfg, generator, SentenceEncoder())
    finally:
        cache.close()
    print(personas.describe(report, personas.output_path(cfg)))
    _print_usage(meter)


def _cmd_trees(args: argparse.Namespace) -> None:
    from data_pipeline.trees import generate_trees

    cfg = _load(args)
    summary, meter = generate_trees(cfg)
    print(f"{cfg.trees.output}: {summary['finished']}/{summary['planned']} conversations finished "
          f"({summary['turns_generated']} turns generated in this run, {summary['committed_turns_at_start']} "
          f"resumed from {cfg.trees.state_dir})")
    _print_usage(meter)


def _cmd_export(args: argparse.Namespace) -> None:
    from data_pipeline import export

    splits = {"train": args.trees}
    if args.eval:
        splits["eval"] = args.eval
    if args.format in ("parquet", "both"):
        for split, path in export.export_parquet(splits, args.out if args.format == "parquet"
                                                 else f"{args.out.rstrip('/')}/parquet").items():
            print(f"parquet {split}: {path}")
    if args.format in ("tfds", "both"):
        out = args.out if args.format == "tfds" else f"{args.out.rstrip('/')}/tfds"
        print(f"tfds (ArrayRecord): {export.export_tfds(splits, out)}  — open with tfds.builder_from_directory")


def _cmd_contamination(args: argparse.Namespace) -> None:
    from data_pipeline import contamination
    from aloe_jax.conversation.aloe_pools import load_pool
    from data_pipeline.embeddings import SentenceEncoder
    from data_pipeline.personas import read_pool_file

    cfg = _load(args)
    encoder = SentenceEncoder()
    rows = []
    for kind in ("profile", "personality"):
        train_file, eval_file = getattr(args, f"train_{kind}"), getattr(args, f"eval_{kind}")
        train = read_pool_file(train_file) if train_file else load_pool(kind, "train", cfg.aloe_source)
        evals = read_pool_file(eval_file) if eval_file else load_pool(kind, "eval", cfg.aloe_source)
        rows += contamination.contamination(encoder, kind, evals, train)
    for kind in ("profile", "personality"):
        print(f"{kind} (threshold {cfg.personas.threshold[kind]:g}):")
        print(contamination.summary_table([r for r in rows if r.kind == kind], cfg.personas.threshold[kind]))
    if args.out:
        contamination.write_report(rows, args.out)
        print(f"report: {args.out} (one eval persona per line with its nearest train persona)")


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="datagen YAML (default: configs/datagen.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. trees.conversations=10 roles.judge.backend.kind=openai")


def register(commands) -> None:
    """Add the data-generation subcommands to the `aloe-jax` parser."""
    personas = commands.add_parser("personas", help="grow a profile or personality pool by self-generation")
    personas.add_argument("--kind", choices=["profile", "personality"], default=None,
                          help="which pool to grow (default: personas.kind of the config)")
    _config_args(personas)
    personas.set_defaults(run=_cmd_personas)

    trees = commands.add_parser("trees", help="generate preference trees (resumes an interrupted run)")
    _config_args(trees)
    trees.set_defaults(run=_cmd_trees)

    # `export` (no suffix) is the trainer's checkpoint → HF model export.
    export = commands.add_parser("export-trees",
                                 help="export tree JSONL to Parquet (HF datasets) and/or TFDS ArrayRecord")
    export.add_argument("trees", nargs="+", help="tree JSONL files (local or gs://) of the train split")
    export.add_argument("--eval", nargs="*", default=[], help="tree JSONL files of the eval split")
    export.add_argument("--out", required=True, help="output folder (local or gs://)")
    export.add_argument("--format", choices=["parquet", "tfds", "both"], default="both",
                        help="both writes <out>/parquet and <out>/tfds")
    export.set_defaults(run=_cmd_export)

    contam = commands.add_parser("contamination", help="nearest train persona of every eval persona")
    for kind in ("profile", "personality"):
        contam.add_argument(f"--train-{kind}", default=None, help=f"JSONL of train {kind}s (default: ALOE's)")
        contam.add_argument(f"--eval-{kind}", default=None, help=f"JSONL of eval {kind}s (default: ALOE's)")
    contam.add_argument("--out", default=None, help="write the per-persona report as JSONL here (local or gs://)")
    _config_args(contam)
    contam.set_defaults(run=_cmd_contamination)

