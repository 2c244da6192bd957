"""`aloe-jax <command>`: the user-facing entry point. User mistakes print one line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys

from aloe_jax import quickstart
from aloe_jax.aot import cli as aot_cli
from aloe_jax.core.errors import AloeError
from aloe_jax.eval import cli as eval_cli
from aloe_jax.train import cli as train_cli
from data_pipeline import cli as datagen_cli

EXIT_USER_ERROR = 2

# Modules that add their own subcommands: each defines `register(commands)` taking the argparse sub-parsers object
# and setting `run=<function(args)>` on every parser it adds. Imports inside them stay lazy (no jax at parse time).
COMMAND_MODULES = (datagen_cli, eval_cli, train_cli, quickstart, aot_cli)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="HF folder (local or gs://) or 'smollm2' (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute and parameter dtype (default float32)")


def _cmd_chat(args: argparse.Namespace) -> None:
    from aloe_jax.models.loader import load_model
    from aloe_jax.sampling.chat import ChatEngine
    from aloe_jax.sampling.sampler import SamplingParams

    if args.max_new_tokens <= 0:
        raise AloeError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    model, tokenizer = load_model(args.model, param_dtype=args.dtype, dtype=args.dtype)
    engine = ChatEngine(model, tokenizer)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.message})
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
    print(engine.reply([messages], params)[0].text)


def _cmd_serve(args: argparse.Namespace) -> None:
    from aloe_jax.models.loader import DEFAULT_MODEL, load_model
    from aloe_jax.sampling.chat import ChatEngine
    from aloe_jax.serving.server import make_server

    if not 0 <= args.port <= 65535:
        raise AloeError(f"--port must be in 0..65535, got {args.port}")
    model, tokenizer = load_model(args.model, param_dtype=args.dtype, dtype=args.dtype)
    name = args.served_name or (args.model or DEFAULT_MODEL)
    try:
        server = make_server(ChatEngine(model, tokenizer), name, args.host, args.port, args.max_batch)
    except OSError as err:
        raise AloeError(f"cannot listen on {args.host}:{args.port}: {err.strerror}") from None
    host, port = server.server_address[:2]
    print(f"serving {name!r} on http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


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
    chat.add_argument("message", help="the user's message")
    add_model_args(chat)
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    chat.add_argument("--seed", type=int, default=0)
    chat.add_argument("--system", default=None, help="optional system prompt")
    chat.set_defaults(run=_cmd_chat)

    serve = commands.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-name", default=None, help="model id clients must send (default: --model)")
    serve.add_argument("--max-batch", type=int, default=64, help="most conversations decoded together")
    serve.set_defaults(run=_cmd_serve)

    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the process exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv is None:  # a real `aloe-jax` process (callers passing argv, e.g. tests, keep their own JAX settings)
        _enable_compilation_cache()
    args = build_parser().parse_args(argv)
    args.dispatch = main  # commands that run other commands (quickstart) call back through it
    try:
        code = args.run(args)  # a command may return a non-zero exit code that is not an error (compile: "does not fit")
    except AloeError as err:
        print(f"aloe-jax {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"aloe-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
