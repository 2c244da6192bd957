"""The simulator's repeat guard, replayed: takes a committed evaluation run's records (the conversations of every case
up to turn K−1, as that run's simulator and model wrote them), lets the embedded SmolLM2 simulator write turn K again
(the evaluation's prompt, generation settings and seed), and runs each guard policy on the same first draws: how
many messages still repeat an earlier one of their case, how many copy the case's previous message word for word
(what makes an exchange loop), how many resamples that took, and a few resampled messages to read.

    python -m benchmarks.loop_guard [--records benchmarks/results/eval_smollm2_100cases_guard/turns.jsonl.gz]
        [--turn 5] [--cases 100] [--out benchmarks/results/loop_guard]

One turn on a fixed history measures the guard alone; a run whose earlier turns were guarded the new way differs
(its histories loop less), so the evaluation at 5 turns stays the number the goal is about. The first draw is the
same call for every policy (it is cached between policies); the policies differ in their resamples.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import tempfile
import time

from aloe_jax.conversation.engine import seeded
from aloe_jax.conversation.repeat_guard import RepeatGuard, normalise
from aloe_jax.eval import prompts
from aloe_jax.eval.cases import load_cases
from aloe_jax.eval.config import EvalConfig
from aloe_jax.llm.cache import CallCache
from aloe_jax.llm.jax_backend import JaxBackend
from aloe_jax.llm.roles import Role

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_SHARED_DATA = _ROOT.parent / "shared" / "aloe_data"
_RECORDS = _ROOT / "benchmarks" / "results" / "eval_smollm2_100cases_guard" / "turns.jsonl.gz"

# name → the guard's settings beside the evaluation's repeat threshold and resample temperature. The first is the
# guard the committed 100-case run used, except that a row now keeps its least similar candidate (that run kept the
# last one; which rows still repeat is the same either way).
POLICIES = {
    "before (turn's top_p 0.9, no nudge)": {"max_resamples": 3, "resample_top_p": None, "nudge": False},
    "top_p 1.0": {"max_resamples": 3, "resample_top_p": 1.0, "nudge": False},
    "top_p 1.0 + nudge": {"max_resamples": 3, "resample_top_p": 1.0, "nudge": True},
    "top_p 1.0 + nudge, 6 resamples (the default now)": {"max_resamples": 6, "resample_top_p": 1.0, "nudge": True},
}


def _records(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", default=str(_RECORDS))
    parser.add_argument("--turn", type=int, default=5)
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--aloe-data", default=str(_SHARED_DATA) if _SHARED_DATA.exists() else None)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from aloe_jax.models.sentence_encoder import SentenceEncoder

    cfg = EvalConfig()
    cases = load_cases(args.aloe_data, args.cases)
    by_key = {(r["case_id"], r["turn"]): r for r in _records(args.records)}
    histories = [[by_key[c.case_id, k] for k in range(1, args.turn)] for c in cases]
    chats = [prompts.simulator_messages(c, [(r["user"], r["assistant"]) for r in h]) for c, h in zip(cases, histories)]
    earlier = [[r["user"] for r in h] for h in histories]
    params = seeded(cfg.simulator.generation, cfg.seed, "simulator", args.turn)
    embed = SentenceEncoder().encode
    with tempfile.TemporaryDirectory() as tmp:
        simulator = Role("simulator", JaxBackend("smollm2-135m"), CallCache(os.path.join(tmp, "calls.sqlite")))
        results = {}
        for name in args.policies:
            guard = RepeatGuard.from_config(
                cfg.simulator.model_validate({**cfg.simulator.model_dump(), **POLICIES[name]}), embed)
            start = time.perf_counter()
            guarded = guard.chat(simulator, chats, params, earlier)
            seconds = time.perf_counter() - start
            copies = sum(normalise(r.text) == normalise(past[-1]) for r, past in zip(guarded.results, earlier))
            resampled = [i for i, n in enumerate(guarded.resamples) if n]
            results[name] = {
                "settings": guard.card(), "seconds": round(seconds, 1), "resampled": len(resampled),
                "resamples": sum(guarded.resamples), "still_repeating": sum(guarded.repeated),
                "copies_previous_message": copies,
                "examples": [{"case_id": cases[i].case_id, "previous": earlier[i][-1],
                              "kept": guarded.results[i].text, "repeats": guarded.repeated[i]}
                             for i in resampled[:4]]}
            print(f"{name}: {results[name]['still_repeating']} of {len(cases)} still repeat, "
                  f"{copies} copy the previous message word for word; {len(resampled)} rows resampled "
                  f"({results[name]['resamples']} resamples), {seconds:.0f} s", flush=True)
            for example in results[name]["examples"][:2]:
                print(f"    before: {example['previous'][:120]!r}\n    kept:   {example['kept'][:120]!r}", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"turn{args.turn}_{args.cases}cases.json"), "w") as f:
            json.dump({"args": vars(args), "load_avg_at_end": os.getloadavg(), "policies": results}, f, indent=1)


if __name__ == "__main__":
    from aloe_jax.core.distributed import cpu_only_without_accelerators

    cpu_only_without_accelerators("benchmark")  # as `aloe-jax` does: no libtpu probe warnings on a CPU host
    main()
