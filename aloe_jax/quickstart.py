"""`aloe-jax quickstart`: the whole pipeline at toy scale on the embedded SmolLM2, with no API key.

personas (a handful grown from ALOE seeds) → preference trees (a few conversations × 3 turns) → SFT → DPO → ALOE
evaluation of base, SFT and DPO on a few cases → one comparison report with the AL(k) plot.

Each stage runs the real `aloe-jax` subcommand with toy-sized overrides, so what the quickstart does is exactly what a
user would type (the commands are printed, and written to `<out>/commands.sh`). Every stage resumes: rerunning the
quickstart with the same `--out` after an interruption skips finished work.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import time

import pydantic

from aloe_jax.core.cli_args import Alias, add_config_args, load_command_config, printed_config
from aloe_jax.core.config import StrictModel
from aloe_jax.core.errors import AloeError


class QuickstartConfig(StrictModel):
    """The toy sizes of `aloe-jax quickstart`, chosen so the whole run fits minutes on a 2-core CPU."""

    output_dir: str = "runs/quickstart"  # rerun with it to resume
    aloe_data: str | None = None  # folder with the ALOE persona files; None: download the pinned revision
    cases: int = pydantic.Field(4, gt=0)  # ALOE cases evaluated per model
    turns: int = pydantic.Field(3, gt=0)  # per conversation, in the trees and the evaluation
    conversations: int = pydantic.Field(4, gt=0)  # preference trees generated
    train_steps: int = pydantic.Field(2, gt=0)  # optimizer steps of SFT and of DPO


QUICKSTART_ALIASES = (
    Alias("--out", "output_dir", "run folder (rerun to resume)"),
    Alias("--aloe-data", "aloe_data", "folder with the ALOE persona files"),
    Alias("--cases", "cases", "ALOE cases evaluated per model", type=int),
    Alias("--turns", "turns", "turns per conversation (trees and evaluation)", type=int),
    Alias("--conversations", "conversations", "preference trees generated", type=int),
    Alias("--train-steps", "train_steps", "optimizer steps of SFT and of DPO", type=int),
)


def _stage_commands(out: pathlib.Path, aloe_data: str | None, cases: int, turns: int, conversations: int,
                    train_steps: int) -> list[tuple[str, list[str]]]:
    """(stage name, argv) in order. Sizes are chosen so the whole run fits minutes on a 2-core CPU."""
    source = [f"aloe_data={aloe_data}"] if aloe_data else []
    datagen = [
        *source, f"cache={out / 'calls.sqlite'}",
        # Short replies: on a 2-core CPU a turn's cost is mostly prefilling the roles' prompts, which grow with every
        # reply. One budget for the conversation roles, so they share compiled sampler programs; the persona
        # generator writes several personas in one reply and gets more.
        "roles.persona_generator.generation.max_tokens=64", f"roles.user.generation.max_tokens={_USER_TOKENS}",
        *(f"roles.{role}.generation.max_tokens={_REPLY_TOKENS}" for role in ("extractor", "hinted", "plain")),
    ]

    def personas(kind: str) -> list[str]:
        return ["personas", f"--kind={kind}", *datagen, f"personas.seeds={out / 'personas' / f'seeds_{kind}.jsonl'}",
                f"personas.output={out / 'personas' / f'{kind}.jsonl'}", f"personas.target_size={_SEEDS[kind] + 2}",
                "personas.candidates_per_prompt=4", "personas.prompts_per_round=1", "personas.max_rounds=2",
                "personas.examples_per_prompt=3"]

    trees_file = out / "trees" / "trees.jsonl"
    trees = [
        f"trees.profiles={out / 'personas' / 'profile.jsonl'}",
        f"trees.personalities={out / 'personas' / 'personality.jsonl'}",
        f"trees.conversations={conversations}", f"trees.turns={turns}", f"trees.batch_size={conversations}",
        f"trees.output={trees_file}", f"trees.state_dir={out / 'trees' / 'state'}",
    ]
    train = [
        # 3-turn trees of 48-token replies pack into ~600 tokens; anything longer would be cut (and reported).
        f"data.path={trees_file}", "data.seq_len=768", "batch_size=2", "micro_batches=1",
        "model.dtype=float32", f"max_steps={train_steps}", f"checkpoint.every_steps={train_steps}",
        "optim.lr=5e-5", "optim.warmup_ratio=0.0",
        # 2 rows per step cannot be split over many data-parallel devices: on a multi-device host, shard the toy
        # model's weights over all of them instead (one device: the same 1×1×1 mesh).
        "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=-1",
    ]
    evaluate = [f"--cases={cases}", f"--turns={turns}", *([f"--aloe-data={aloe_data}"] if aloe_data else []),
                f"model.generation.max_tokens={_REPLY_TOKENS}", f"simulator.generation.max_tokens={_USER_TOKENS}",
                f"knowing.generation.max_tokens={_REPLY_TOKENS}", "judge.history_turns=1"]
    return [
        ("personas (profiles)", personas("profile")),
        ("personas (personalities)", personas("personality")),
        ("trees", ["trees", *datagen, *trees]),
        ("sft", ["sft", "--config=sft", *train, f"--out={out / 'sft'}"]),
        ("dpo", ["dpo", "--config=dpo", *train, f"--out={out / 'dpo'}", f"--model={out / 'sft'}"]),
        ("eval base", ["eval", "--model=smollm2-135m", f"--out={out / 'eval' / 'base'}", *evaluate]),
        ("eval sft", ["eval", f"--model={out / 'sft'}", f"--out={out / 'eval' / 'sft'}", *evaluate]),
        ("eval dpo", ["eval", f"--model={out / 'dpo'}", f"--out={out / 'eval' / 'dpo'}", *evaluate]),
        ("report", ["eval-compare", str(out / "eval" / "base"), str(out / "eval" / "sft"),
                    str(out / "eval" / "dpo"), f"--out={out / 'report'}"]),
    ]


# Token budgets of the quickstart's replies: assistant-side roles (extractor, responders, model under test) and the
# simulated user, whose messages are short as real users' are.
_REPLY_TOKENS, _USER_TOKENS = 48, 32

# How many ALOE train personas seed each pool: a handful, so the toy pool is grown by self-generation.
_SEEDS = {"profile": 6, "personality": 4}


def _write_seeds(out: pathlib.Path, aloe_data: str | None) -> None:
    from aloe_jax.conversation.aloe_pools import load_pool

    folder = out / "personas"
    folder.mkdir(parents=True, exist_ok=True)
    for kind, n in _SEEDS.items():
        path = folder / f"seeds_{kind}.jsonl"
        if not path.exists():
            pool = load_pool(kind, "train", aloe_data)
            path.write_text("".join(json.dumps(p) + "\n" for p in pool[:n]))


def run(args: argparse.Namespace) -> None:
    """Run every stage in order, each as the `aloe-jax` command a user would type."""
    cfg = load_command_config(QuickstartConfig, args)
    if printed_config(cfg, args):
        return
    # args.dispatch is `aloe-jax`'s own main (set by aloe_jax.cli): each stage runs as the same command a user types.
    out = pathlib.Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _write_seeds(out, cfg.aloe_data)
    stages = _stage_commands(out, cfg.aloe_data, cfg.cases, cfg.turns, cfg.conversations, cfg.train_steps)
    (out / "commands.sh").write_text("".join("aloe-jax " + shlex.join(argv) + "\n" for _, argv in stages))
    timings = []
    start = time.monotonic()
    for i, (name, argv) in enumerate(stages, 1):
        print(f"\n== quickstart [{i}/{len(stages)}] {name}: aloe-jax {shlex.join(argv)}", flush=True)
        t0 = time.monotonic()
        code = args.dispatch(argv)
        if code != 0:
            raise AloeError(f"stage {name!r} failed (exit {code}); fix the error above and rerun the same command "
                            "to resume")
        timings.append((name, time.monotonic() - t0))
    total = time.monotonic() - start
    lines = ["| stage | seconds |", "|---|---|", *(f"| {n} | {s:.0f} |" for n, s in timings), f"| total | {total:.0f} |"]
    (out / "timings.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    print(f"\nquickstart done in {total / 60:.1f} min: report {out / 'report'}, commands {out / 'commands.sh'}")


def register(commands) -> None:
    """Add the `quickstart` subcommand."""
    parser = commands.add_parser("quickstart", help="the whole pipeline at toy scale on the embedded SmolLM2")
    add_config_args(parser, None, QUICKSTART_ALIASES)
    parser.set_defaults(run=run)
