"""`aloe-jax <command>`: the user-facing entry point. User mistakes print one line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Literal

import pydantic

from aloe_jax import quickstart
from aloe_jax.aot import cli as aot_cli
from aloe_jax.core.cli_args import Alias, add_config_args, load_command_config, printed_config, take_leftovers
from aloe_jax.core.config import StrictModel
from aloe_jax.core.distributed import cpu_only_without_accelerators
from aloe_jax.core.errors import AloeError, ConfigError
from aloe_jax.core.interrupts import EXIT_INTERRUPTED, quit_on_second_interrupt
from aloe_jax.eval import cli as eval_cli
from aloe_jax.rl import cli as rl_cli
from aloe_jax.train import cli as train_cli
from aloe_jax.llm.base import GenerationParams
from aloe_jax.llm.roles import LocalModel
from data_pipeline import cli as datagen_cli

EXIT_USER_ERROR = 2

# Modules that add their own subcommands: each defines `register(commands)` taking the argparse sub-parsers object
# and setting `run=<function(args)>` on every parser it adds. Imports inside them stay lazy (no jax at parse time).
COMMAND_MODULES = (datagen_cli, eval_cli, train_cli, rl_cli, quickstart, aot_cli)


class ChatModel(LocalModel):
    """The model `chat` replies with, and how."""

    system_prompt: str | None = None
    generation: GenerationParams = GenerationParams(temperature=0.0, max_tokens=128)  # greedy


class ChatConfig(StrictModel):
    """`aloe-jax chat`: one reply to one message."""

    message: str | None = None  # the user's message
    model: ChatModel = ChatModel()


class ServeConfig(StrictModel):
    """`aloe-jax serve`: a model behind an OpenAI-compatible HTTP API."""

    model: LocalModel = LocalModel()
    host: str = "127.0.0.1"  # loopback only
    port: int = pydantic.Field(8000, ge=0, le=65535)  # 0: any free port
    served_name: str | None = None  # model id clients must send; None: model.path
    max_batch: int = pydantic.Field(16, gt=0)  # request slots: most requests (choices) decoded together
    max_context: int | None = pydantic.Field(None, gt=0)  # tokens per request; None: the model's window, ≤ 4096
    api_key_env: str | None = None  # name of an environment variable holding the API key clients must send
    log_level: Literal["debug", "info", "warning", "error"] = "info"  # info: one access-log line per request
    kv_dtype: Literal["float32", "bfloat16"] | None = None  # KV cache dtype; None: the model's compute dtype
    max_cache_gb: float = pydantic.Field(8.0, gt=0)  # the KV cache (max_batch × max_context tokens) must fit in this


_MODEL_ALIASES = (
    Alias("--model", "model.path", "HF folder (local or gs://), trainer run folder or smollm2-135m (embedded)"),
    Alias("--dtype", "model.dtype", "dtype of the weights and computation", choices=eval_cli.DTYPES),
)
CHAT_ALIASES = (
    Alias("message", "message", "the user's message"),
    *_MODEL_ALIASES,
    Alias("--max-tokens", "model.generation.max_tokens", "most tokens in the reply", type=int),
    Alias("--max-new-tokens", "model.generation.max_tokens", "deprecated: use --max-tokens", type=int,
          deprecated_for="--max-tokens"),
    Alias("--temperature", "model.generation.temperature", "0 means greedy", type=float),
    Alias("--seed", "model.generation.seed", "sampling seed", type=int),
    Alias("--system", "model.system_prompt", "system prompt"),
)
SERVE_ALIASES = (
    *_MODEL_ALIASES,
    Alias("--host", "host", "address to listen on"),
    Alias("--port", "port", "port to listen on", type=int),
    Alias("--served-name", "served_name", "model id clients must send"),
    Alias("--max-batch", "max_batch", "most requests (choices) decoded together", type=int),
    Alias("--max-context", "max_context", "most prompt + reply tokens per request (default: the model's, ≤ 4096)",
          type=int),
    Alias("--api-key-env", "api_key_env", "environment variable holding the bearer key clients must send"),
    Alias("--log-level", "log_level", "debug, info (one access-log line per request), warning or error"),
    Alias("--kv-dtype", "kv_dtype", "KV cache dtype (bfloat16 halves the cache)", choices=("float32", "bfloat16")),
)
SERVE_CONTEXT_CAP = 4096  # default --max-context: the model's window, at most this (the cache is sized by it)


def _cmd_chat(args: argparse.Namespace) -> None:
    cfg = load_command_config(ChatConfig, args)
    if printed_config(cfg, args):
        return
    if cfg.message is None:
        raise ConfigError("chat needs a message: aloe-jax chat 'Hello!' (or message=...)")
    from aloe_jax.models.loader import load_model
    from aloe_jax.sampling.chat import ChatEngine
    from aloe_jax.sampling.sampler import SamplingParams

    model, tokenizer = load_model(cfg.model.path, param_dtype=cfg.model.dtype, dtype=cfg.model.dtype)
    engine = ChatEngine(model, tokenizer)
    messages = [{"role": "system", "content": cfg.model.system_prompt}] if cfg.model.system_prompt else []
    messages.append({"role": "user", "content": cfg.message})
    gen = cfg.model.generation
    params = SamplingParams(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k,
                            max_new_tokens=gen.max_tokens, seed=gen.seed)
    print(engine.reply([messages], params)[0].text)


def _cmd_serve(args: argparse.Namespace) -> None:
    cfg = load_command_config(ServeConfig, args)
    if printed_config(cfg, args):
        return
    api_key = None
    if cfg.api_key_env is not None:
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            raise ConfigError(f"api_key_env={cfg.api_key_env}: that environment variable is unset or empty")
    import ipaddress
    import logging

    from aloe_jax.models.loader import load_model
    from aloe_jax.models.tokenizer import stop_token_ids
    from aloe_jax.sampling.sessions import cache_bytes_per_token
    from aloe_jax.serving.scheduler import ContinuousScheduler
    from aloe_jax.serving.server import make_server

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        loopback = ipaddress.ip_address(cfg.host).is_loopback
    except ValueError:
        loopback = cfg.host == "localhost"
    if not loopback and api_key is None:
        print(f"warning: serving on {cfg.host} without an API key: anyone who can reach it can use it "
              "(set --api-key-env)", file=sys.stderr, flush=True)
    model, tokenizer = load_model(cfg.model.path, param_dtype=cfg.model.dtype, dtype=cfg.model.dtype)
    context = cfg.max_context or min(model.cfg.max_position_embeddings, SERVE_CONTEXT_CAP)
    cache_gb = cfg.max_batch * (context + 1) * cache_bytes_per_token(model, cfg.kv_dtype) / 2**30
    if cache_gb > cfg.max_cache_gb:
        raise ConfigError(f"the KV cache for --max-batch {cfg.max_batch} × --max-context {context} takes "
                          f"{cache_gb:.1f} GB, over max_cache_gb={cfg.max_cache_gb:g}: lower one of them, use "
                          "--kv-dtype bfloat16, or raise max_cache_gb")
    scheduler = ContinuousScheduler(model, stop_token_ids(tokenizer), context_length=context,
                                    max_batch=cfg.max_batch, kv_dtype=cfg.kv_dtype)
    name = cfg.served_name or cfg.model.path
    try:
        server = make_server(scheduler, tokenizer, name, cfg.host, cfg.port, api_key=api_key,
                             log_level=cfg.log_level)
    except OSError as err:
        raise AloeError(f"cannot listen on {cfg.host}:{cfg.port}: {err.strerror}") from None
    print(f"serving {name!r} on http://{server.host}:{server.port}/v1 (OpenAI-compatible; Ctrl-C to stop)",
          flush=True)
    server.serve_forever()


def _enable_compilation_cache() -> None:
    """Keep compiled XLA programs on disk (JAX's persistent cache) so that every later command, and every stage of
    the quickstart, reuses them: a sampler program for SmolLM2 takes tens of seconds to compile on a small CPU and is
    the same for base, SFT and DPO weights. Users can point JAX_COMPILATION_CACHE_DIR elsewhere; multi-process jobs
    are left alone (processes would race on the same files)."""
    if int(os.environ.get("ALOE_JAX_NUM_PROCESSES", "1")) > 1 or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    from aloe_jax.core.storage import cache_dir

    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir() / "xla")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `aloe-jax` command."""
    parser = argparse.ArgumentParser(prog="aloe-jax", description=__doc__.split(":")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = commands.add_parser("chat", help="reply to one message (greedy by default)")
    add_config_args(chat, None, CHAT_ALIASES)
    chat.set_defaults(run=_cmd_chat)

    serve = commands.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    add_config_args(serve, None, SERVE_ALIASES)
    serve.set_defaults(run=_cmd_serve)

    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the process exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv is None:  # a real `aloe-jax` process (callers passing argv, e.g. tests, keep their own JAX settings)
        _enable_compilation_cache()
    parser = build_parser()
    args, leftovers = parser.parse_known_args(argv)
    unknown = take_leftovers(args, leftovers)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if argv is None:
        cpu_only_without_accelerators(args.command)
        quit_on_second_interrupt(args.command)
    args.dispatch = main  # commands that run other commands (quickstart) call back through it
    try:
        code = args.run(args)  # a command may return a non-zero exit code that is not an error (compile: "does not fit")
    except AloeError as err:
        print(f"aloe-jax {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"aloe-jax {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
