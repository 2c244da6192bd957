"""Subcommands of data generation: `personas`, `trees`, `export-trees`, `contamination` (registered in aloe_jax/cli.py).
Heavy imports (jax, datasets, tfds) stay inside the commands so `aloe-jax --help` is instant."""

from __future__ import annotations

import argparse

from aloe_jax.core import storage
from aloe_jax.core.cli_args import Alias, add_config_args, load_command_config, printed_config
from aloe_jax.core.errors import ConfigError

_ALOE_DATA = Alias("--aloe-data", "aloe_data", "folder (local or gs://) or URL of the ALOE pool files")
PERSONAS_ALIASES = (Alias("--kind", "personas.kind", "which pool to grow", choices=("profile", "personality")),
                    _ALOE_DATA)
TREES_ALIASES = (_ALOE_DATA,)
CONTAMINATION_ALIASES = (
    *(Alias(f"--{split}-{kind}", f"contamination.{split}_{kind}", f"JSONL of {split} {kind}s (default: ALOE's)")
      for kind in ("profile", "personality") for split in ("train", "eval")),
    Alias("--out", "contamination.output", "write the per-persona report as JSONL here (local or gs://)"),
    _ALOE_DATA,
)
EXPORT_ALIASES = (
    Alias("trees", "train", "tree JSONL files (local or gs://) of the train split", nargs="*"),
    Alias("--eval", "eval", "tree JSONL files of the eval split", nargs="*"),
    Alias("--out", "output_dir", "output folder (local or gs://)"),
    Alias("--format", "format", "trees: Parquet of the tree schema; trl-dpo, trl-sft: Parquet for TRL's DPOTrainer, "
          "SFTTrainer; tfds: ArrayRecord; both: trees in <out>/parquet + tfds in <out>/tfds",
          choices=("trees", "trl-dpo", "trl-sft", "tfds", "both", "parquet")),
)


def _load(args: argparse.Namespace):
    """The DatagenConfig of the command line, or None after --print-config printed it."""
    from data_pipeline.config import DatagenConfig

    cfg = load_command_config(DatagenConfig, args)
    return None if printed_config(cfg, args) else cfg


def _print_usage(meter) -> None:
    if meter.by_role:
        print("usage per role:\n" + meter.table())


def _cmd_personas(args: argparse.Namespace) -> None:
    cfg = _load(args)
    if cfg is None:
        return
    from aloe_jax.llm.cache import CallCache
    from aloe_jax.llm.roles import Role, make_backend
    from aloe_jax.llm.usage import UsageMeter
    from data_pipeline import personas
    from aloe_jax.models.sentence_encoder import SentenceEncoder

    meter = UsageMeter(cfg.prices)
    cache = CallCache(cfg.cache)
    try:
        # One-shot prompts (fresh examples each call): nothing for a session cache to keep, only memory to hold.
        backend = cfg.roles.persona_generator.backend.model_copy(update={"sessions": False})
        generator = Role("persona_generator", make_backend(backend), cache, meter)
        report = personas.grow_pool(cfg, generator, SentenceEncoder())
    finally:
        cache.close()
    print(personas.describe(report, personas.output_path(cfg)))
    _print_usage(meter)


def _cmd_trees(args: argparse.Namespace) -> None:
    cfg = _load(args)
    if cfg is None:
        return
    from data_pipeline.trees import generate_trees

    summary, meter = generate_trees(cfg)
    print(f"{cfg.trees.output}: {summary['finished']}/{summary['planned']} conversations finished "
          f"({summary['turns_generated']} turns generated in this run, {summary['committed_turns_at_start']} "
          f"resumed from {cfg.trees.state_dir})")
    print(summary["judge_calibration"]["line"])
    guard = summary["user_repeat_guard"]
    print(f"simulated user, per turn: resamples {guard['resamples_per_turn']}, messages still repeating an earlier "
          f"one {guard['repeats_per_turn']}")
    _print_usage(meter)


def _cmd_export(args: argparse.Namespace) -> None:
    from data_pipeline.config import ExportTreesConfig

    cfg = load_command_config(ExportTreesConfig, args)
    if printed_config(cfg, args):
        return
    from data_pipeline import export

    if not cfg.train or cfg.output_dir is None:
        raise ConfigError("export-trees needs tree files and a folder: export-trees TREES.jsonl [...] --out DIR")
    storage.require_writable_folder(cfg.output_dir)
    splits = {"train": cfg.train}
    if cfg.eval:
        splits["eval"] = cfg.eval
    if cfg.format != "tfds":
        kind = "trees" if cfg.format in ("both", "parquet") else cfg.format
        out = f"{cfg.output_dir.rstrip('/')}/parquet" if cfg.format == "both" else cfg.output_dir
        for split, path in export.export_parquet(splits, out, kind).items():
            print(f"parquet ({kind}) {split}: {path}")
    if cfg.format in ("tfds", "both"):
        out = cfg.output_dir if cfg.format == "tfds" else f"{cfg.output_dir.rstrip('/')}/tfds"
        print(f"tfds (ArrayRecord): {export.export_tfds(splits, out)}  — open with tfds.builder_from_directory")


def _cmd_contamination(args: argparse.Namespace) -> None:
    cfg = _load(args)
    if cfg is None:
        return
    from data_pipeline import contamination
    from aloe_jax.conversation.aloe_pools import load_pool
    from aloe_jax.models.sentence_encoder import SentenceEncoder
    from data_pipeline.personas import read_pool_file

    encoder = SentenceEncoder()
    rows = []
    for kind in ("profile", "personality"):
        train_file, eval_file = (getattr(cfg.contamination, f"{split}_{kind}") for split in ("train", "eval"))
        train = read_pool_file(train_file) if train_file else load_pool(kind, "train", cfg.aloe_data)
        evals = read_pool_file(eval_file) if eval_file else load_pool(kind, "eval", cfg.aloe_data)
        rows += contamination.contamination(encoder, kind, evals, train)
    for kind in ("profile", "personality"):
        print(f"{kind} (threshold {cfg.personas.threshold[kind]:g}):")
        print(contamination.summary_table([r for r in rows if r.kind == kind], cfg.personas.threshold[kind]))
    if cfg.contamination.output:
        contamination.write_report(rows, cfg.contamination.output)
        print(f"report: {cfg.contamination.output} (one eval persona per line with its nearest train persona)")


def register(commands) -> None:
    """Add the data-generation subcommands to the `aloe-jax` parser."""
    personas = commands.add_parser("personas", help="grow a profile or personality pool by self-generation")
    add_config_args(personas, "datagen", PERSONAS_ALIASES)
    personas.set_defaults(run=_cmd_personas)

    trees = commands.add_parser("trees", help="generate preference trees (resumes an interrupted run)")
    add_config_args(trees, "datagen", TREES_ALIASES)
    trees.set_defaults(run=_cmd_trees)

    # `export` (no suffix) is the trainer's checkpoint → HF model export.
    export = commands.add_parser("export-trees",
                                 help="export tree JSONL to Parquet (trees, TRL DPO / SFT) and/or TFDS ArrayRecord")
    add_config_args(export, None, EXPORT_ALIASES)
    export.set_defaults(run=_cmd_export)

    contam = commands.add_parser("contamination", help="nearest train persona of every eval persona")
    add_config_args(contam, "datagen", CONTAMINATION_ALIASES)
    contam.set_defaults(run=_cmd_contamination)
