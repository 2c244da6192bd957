"""Multi-turn decoding with and without session caches, same run: the ALOE evaluation's model under test and user
simulator (its prompts, generation settings and seeds) on SmolLM2, N conversations × T turns, each turn sending the
whole conversation. Without sessions every call prefills its whole prompt; with them a call prefills only what its
row does not hold. Prints prompt tokens prefilled and wall time of each, the goals (≥ 4× fewer prefill tokens,
≥ 2.5× less wall time) as met or missed, peak RSS and the session cache's bytes.

    python -m benchmarks.multiturn [--conversations 32] [--turns 6] [--dtype float32] [--kv-dtype bfloat16]
        [--out benchmarks/results/multiturn]

The judge is left out: it scores options (one forward pass, no sessions), the same work either way. Cases are the
ALOE evaluation's first N (`--aloe-data`, default ../shared/aloe_data when present, else the pinned download).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import time

import jax

from aloe_jax.conversation.engine import seeded
from aloe_jax.conversation.messages import chat_messages
from aloe_jax.eval import prompts
from aloe_jax.eval.cases import load_cases
from aloe_jax.eval.config import EvalConfig
from aloe_jax.llm.jax_backend import JaxBackend
from aloe_jax.llm.roles import Role
from aloe_jax.llm.usage import UsageMeter
from aloe_jax.sampling.chat import ChatEngine

GOAL_PREFILL, GOAL_WALL = 4.0, 2.5
_SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "aloe_data"


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def run(engine: ChatEngine, cases, turns: int, cfg: EvalConfig) -> dict:
    """The evaluation's simulator → model loop; per role: prompt tokens, prefilled tokens, seconds; the transcripts."""
    meter = UsageMeter()
    backend = JaxBackend(engine=engine, name="jax:smollm2-135m")
    simulator, model = Role("simulator", backend, None, meter), Role("model", backend, None, meter)
    pairs = [[] for _ in cases]
    seconds = {"simulator": 0.0, "model": 0.0}
    per_turn = []
    start = time.perf_counter()
    for turn in range(1, turns + 1):
        t0 = time.perf_counter()
        users = simulator.chat([prompts.simulator_messages(c, p) for c, p in zip(cases, pairs)],
                               seeded(cfg.simulator.generation, cfg.seed, "simulator", turn))
        t1 = time.perf_counter()
        replies = model.chat([chat_messages(p, u.text, cfg.model.system_prompt) for p, u in zip(pairs, users)],
                             seeded(cfg.model.generation, cfg.seed, "model", turn))
        t2 = time.perf_counter()
        seconds["simulator"] += t1 - t0
        seconds["model"] += t2 - t1
        per_turn.append({"turn": turn, "simulator_s": round(t1 - t0, 2), "model_s": round(t2 - t1, 2),
                         "simulator_reused": sum(u.cached_tokens for u in users),
                         "simulator_prompt": sum(u.prompt_tokens for u in users),
                         "model_reused": sum(r.cached_tokens for r in replies),
                         "model_prompt": sum(r.prompt_tokens for r in replies)})
        print(f"  turn {turn}: {per_turn[-1]}", flush=True)
        for p, u, r in zip(pairs, users, replies):
            p.append((u.text, r.text))
    wall = time.perf_counter() - start
    roles = {role: {"prompt_tokens": u.prompt_tokens, "prefilled_tokens": u.prompt_tokens - u.reused_prompt_tokens,
                    "reused_tokens": u.reused_prompt_tokens, "completion_tokens": u.completion_tokens,
                    "seconds": round(seconds[role], 2)}
             for role, u in meter.by_role.items()}
    return {"wall_s": round(wall, 2), "prefilled_tokens": sum(r["prefilled_tokens"] for r in roles.values()),
            "prompt_tokens": sum(r["prompt_tokens"] for r in roles.values()), "roles": roles, "per_turn": per_turn,
            "transcripts": pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--kv-dtype", default=None, choices=("float32", "bfloat16"), help="default: --dtype")
    parser.add_argument("--aloe-data", default=str(_SHARED_DATA) if _SHARED_DATA.exists() else None)
    parser.add_argument("--out", default=None, help="folder for result.json (and nothing else)")
    args = parser.parse_args()

    from aloe_jax.models.loader import load_model

    cfg = EvalConfig()  # the evaluation's generation settings and seed
    cases = load_cases(args.aloe_data, args.conversations)
    model, tokenizer = load_model(args.model, param_dtype=args.dtype, dtype=args.dtype)
    rss_loaded = _rss_gib()
    print(f"{args.conversations} conversations x {args.turns} turns, {args.model} {args.dtype} on "
          f"{jax.devices()[0].platform} ({os.cpu_count()} cores seen); simulator {cfg.simulator.generation.max_tokens} "
          f"tokens, model {cfg.model.generation.max_tokens}", flush=True)
    print("without sessions:", flush=True)
    plain = run(ChatEngine(model, tokenizer), cases, args.turns, cfg)
    rss_plain = _rss_gib()
    print("with sessions:", flush=True)
    engine = ChatEngine(model, tokenizer, sessions=True, kv_dtype=args.kv_dtype)
    kept = run(engine, cases, args.turns, cfg)
    rss_sessions = _rss_gib()
    pools = engine.sessions.pools
    cache_bytes = sum(sum(x.nbytes for x in jax.tree.leaves(p.cache)) for p in pools if p.cache is not None)

    prefill_ratio = plain["prefilled_tokens"] / max(kept["prefilled_tokens"], 1)
    wall_ratio = plain["wall_s"] / kept["wall_s"]
    same = plain["transcripts"] == kept["transcripts"]
    lines = [
        f"prompt tokens (both runs): {plain['prompt_tokens']}",
        f"prefilled: without sessions {plain['prefilled_tokens']}, with {kept['prefilled_tokens']} — "
        f"{prefill_ratio:.2f}x fewer (goal >= {GOAL_PREFILL}x: {'met' if prefill_ratio >= GOAL_PREFILL else 'MISSED'})",
        f"wall: without sessions {plain['wall_s']:.1f} s, with {kept['wall_s']:.1f} s — {wall_ratio:.2f}x less "
        f"(goal >= {GOAL_WALL}x: {'met' if wall_ratio >= GOAL_WALL else 'MISSED'})",
        *(f"  {role}: prefilled {plain['roles'][role]['prefilled_tokens']} -> {kept['roles'][role]['prefilled_tokens']}"
          f" tokens ({kept['roles'][role]['reused_tokens']} reused), {plain['roles'][role]['seconds']:.1f} s -> "
          f"{kept['roles'][role]['seconds']:.1f} s" for role in ("simulator", "model")),
        f"transcripts identical with and without sessions: {same}",
        f"session cache: {len(pools)} pools, {cache_bytes / 2**20:.0f} MiB "
        f"({', '.join(f'{p.rows} rows x {p.capacity} slots' for p in pools)}), KV {engine.sessions.pools[0].kv_dtype}",
        f"peak RSS: {rss_loaded:.2f} GiB after loading, {rss_plain:.2f} GiB after the run without sessions, "
        f"{rss_sessions:.2f} GiB after the run with sessions (ru_maxrss: the process's peak so far)",
    ]
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        result = {"args": vars(args), "host": platform.node(), "cpu_count": os.cpu_count(),
                  "load_avg_at_end": os.getloadavg(), "summary": lines, "prefill_ratio": round(prefill_ratio, 3),
                  "wall_ratio": round(wall_ratio, 3), "transcripts_identical": same, "cache_bytes": cache_bytes,
                  "peak_rss_gib": {"loaded": rss_loaded, "after_plain": rss_plain, "after_sessions": rss_sessions},
                  "without_sessions": {k: v for k, v in plain.items() if k != "transcripts"},
                  "with_sessions": {k: v for k, v in kept.items() if k != "transcripts"}}
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    from aloe_jax.core.distributed import cpu_only_without_accelerators

    cpu_only_without_accelerators("benchmark")  # as `aloe-jax` does: no libtpu probe warnings on a CPU host
    main()
