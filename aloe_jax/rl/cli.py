"""`aloe-jax rl`: online GRPO against the simulated user, from a YAML config + key=value overrides."""

from __future__ import annotations

import argparse

from aloe_jax.core import storage
from aloe_jax.core.cli_args import Alias, add_config_args, load_command_config, printed_config
from aloe_jax.eval.cli import role_overrides
from aloe_jax.train.cli import DTYPES

RL_ALIASES = (
    Alias("--model", "model.path", "starting policy: HF folder (local or gs://), trainer run folder or smollm2-135m"),
    Alias("--dtype", "model.dtype", "dtype of activations and matmuls (master weights: model.param_dtype)",
          choices=DTYPES),
    Alias("--out", "output_dir", "local run folder; rerunning with it resumes"),
    Alias("--iterations", "iterations", "rollout → update iterations", type=int),
    Alias("--judge", "judge.backend", "judge: model path/preset or openai:MODEL[@URL]",
          expand=lambda spec: role_overrides("judge", spec)),
    Alias("--simulator", "simulator.backend", "user simulator: model path/preset or openai:MODEL[@URL]",
          expand=lambda spec: role_overrides("simulator", spec)),
    Alias("--aloe-data", "rollout.aloe_data", "folder (local or gs://) with the ALOE train pools"),
)


def _rl(args: argparse.Namespace) -> None:
    from aloe_jax.rl.config import RLConfig

    cfg = load_command_config(RLConfig, args)
    if printed_config(cfg, args):
        return
    storage.require_writable_folder(cfg.output_dir)
    from aloe_jax.rl.loop import run

    run(cfg)


def register(commands) -> None:
    """Add the rl subcommand."""
    parser = commands.add_parser("rl", help="online multi-turn RL: GRPO on judge-rewarded rollouts against the "
                                 "simulated user (tree-packed, sharded, resumable)")
    add_config_args(parser, "rl", RL_ALIASES)
    parser.set_defaults(run=_rl)
