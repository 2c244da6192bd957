"""Online RL (`aloe-jax rl`, GRPO on tree-packed rollouts): what one update costs.

(a) Tokens through the policy's forward per update, tree-packed (one row per rollout tree: the spine plus G − 1
    side branches per turn, `packing.pack_rollout`) vs naive (one sequence per candidate: its full history plus the
    reply, as a per-sample GRPO trainer scores it), on the same rollouts, counted by `loop.rollout_batch(...,
    naive_count=True)`. No model runs: the rollouts are synthetic TreeRecords with ALOE-like lengths (user messages
    40–60 words, replies 60–100 words), tokenized with the embedded SmolLM2 tokenizer; G = 4, K = 5 is the headline
    (goal: ≥ 3× fewer packed tokens), with G = 2 / 8 and K = 3 / 10 beside it.
(b) The wall split of an iteration (rollout: simulator / policy sampling / rewards; update): `aloe_jax.rl.loop.run`
    for a few iterations on a tiny word-level random Llama (the recipe of tests/test_rl.py) in every role but the
    judge (the rule-based keyword judge), read back from the run's metrics JSONL.

    python -m benchmarks.rl [--trees 8] [--part counts|split|both] [--iterations 2] [--out benchmarks/results/rl]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("I really enjoy long walks with my dog and cooking spicy food after work but my schedule as a nurse makes "
         "it hard to plan anything so quick tips that fit a busy week would help a lot thanks for the idea maybe "
         "try to keep it simple and cheap because money is tight this month").split()
USER_WORDS, REPLY_WORDS = (40, 60), (60, 100)
HEADLINE = (4, 5)  # (G, K)
GOAL = 3.0  # naive / packed tokens at the headline setting
GRID = [(4, 5), (2, 5), (8, 5), (4, 3), (4, 10), (2, 3), (8, 10)]


def _text(rng: random.Random, lo_hi: tuple[int, int]) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*lo_hi))).capitalize() + "."


def make_rollouts(count: int, group: int, turns: int, seed: int = 0):
    """`count` synthetic rollout trees of `turns` turns with `group` rewarded candidates each (the best continues)."""
    from aloe_jax.conversation.records import Candidate, TreeRecord, rollout_turn

    rng = random.Random(f"{seed}:{group}:{turns}")
    trees = []
    for i in range(count):
        tree_turns = []
        for _ in range(turns):
            candidates = [Candidate(text=_text(rng, REPLY_WORDS), reward=float(rng.randint(1, 5)))
                          for _ in range(group)]
            best = max(range(group), key=lambda j: (candidates[j].reward, -j))
            tree_turns.append(rollout_turn(_text(rng, USER_WORDS), candidates, best))
        trees.append(TreeRecord(id=f"bench{i}", turns=tree_turns, meta={"rollout": True}))
    return trees


def count_tokens(trees_per_setting: int) -> list[dict]:
    """Packed vs naive tokens per update for every (G, K) of GRID."""
    from aloe_jax.models import gguf
    from aloe_jax.rl.config import RLConfig
    from aloe_jax.rl.loop import rollout_batch

    tokenizer = gguf.read_gguf(gguf.smollm2_gguf_path())[2]
    rows = []
    for group, turns in GRID:
        trees = make_rollouts(trees_per_setting, group, turns)
        cfg = RLConfig.model_validate({"data": {"seq_len": 1 << 15},
                                       "rollout": {"cases": len(trees), "group_size": group, "turns": turns}})
        built = rollout_batch(trees, tokenizer, cfg, naive_count=True)
        assert built.turns_cut == 0, "seq_len too small for the synthetic trees"
        rows.append({"G": group, "K": turns, "trees": len(trees), "candidates": len(trees) * group * turns,
                     "packed_tokens": built.packed_tokens, "naive_tokens": built.naive_tokens,
                     "ratio": built.naive_tokens / built.packed_tokens,
                     "packed_per_tree": built.packed_tokens / len(trees),
                     "longest_row": int((built.batch["segment"] >= 0).sum(axis=1).max())
                     if "segment" in built.batch else None})
    return rows


def counts_table(rows: list[dict]) -> str:
    lines = ["| G | K | trees | candidates | packed tokens | naive tokens | naive / packed | packed per tree |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['G']} | {r['K']} | {r['trees']} | {r['candidates']} | {r['packed_tokens']:,} | "
                     f"{r['naive_tokens']:,} | {r['ratio']:.2f}x | {r['packed_per_tree']:,.0f} |")
    return "\n".join(lines)


# ---- (b) the wall split ------------------------------------------------------------------------------------------

POLICY_WORDS = ["[UNK]", "user", "assistant", "system", "hello", "number", *"0123456789", "tea", "he", "likes",
                "birds", "and", "a", "is", "good", "day", "it", "we", "you", "me", "to", "of", "in", "on", "go", "now",
                "yes", "no", "why", "how", "what", "run", "sing", "read", "play", "cook", "walk", "fish", "book",
                "sun", "rain", "blue", "red"]


def word_policy(folder: pathlib.Path) -> str:
    """tests/test_rl.py's tiny random Llama over a word-level vocabulary with SmolLM2's chat template (an HF folder)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from aloe_jax.models import gguf

    template = gguf.read_gguf(gguf.smollm2_gguf_path())[2].chat_template
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(POLICY_WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    fast.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": "<|im_start|>"})
    fast.chat_template = template
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                   tie_word_embeddings=False, pad_token_id=fast.pad_token_id,
                                   bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    folder.mkdir(parents=True, exist_ok=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return str(folder)


def aloe_data() -> str | None:
    """The ALOE pools shared with the tests when this checkout has them (else the pinned download)."""
    shared = pathlib.Path(__file__).resolve().parents[2] / "shared" / "aloe_data"
    return str(shared) if shared.is_dir() else None


SPLIT_KEYS = ("rollout_s", "seconds/simulator", "seconds/policy", "seconds/rewards", "update_s", "packed_tokens",
              "rollout_tokens_per_s", "update_tokens_per_s")


def wall_split(iterations: int, cases: int, group: int, turns: int, max_tokens: int, seq_len: int,
               work: pathlib.Path) -> list[dict]:
    from aloe_jax.rl.config import RLConfig
    from aloe_jax.rl.loop import run

    policy = word_policy(work / "policy")
    cfg = RLConfig.model_validate(dict(
        model={"path": policy, "dtype": "float32"}, output_dir=str(work / "run"), iterations=iterations,
        data={"seq_len": seq_len},
        rollout={"cases": cases, "group_size": group, "turns": turns, "aloe_data": aloe_data(),
                 "generation": {"temperature": 1.0, "max_tokens": max_tokens}},
        simulator={"backend": {"kind": "jax", "model": policy}, "repeat_threshold": None,
                   "generation": {"max_tokens": max_tokens}},
        judge={"backend": {"kind": "keyword", "model": "tea"}, "method": "logprobs"},
        optim={"lr": 3e-3, "schedule": "constant", "warmup_steps": 0}, log={"progress_bar": False}))
    began = time.perf_counter()
    run(cfg, show_progress=False)
    total = time.perf_counter() - began
    logged = [json.loads(line) for line in open(work / "run" / "logs" / "metrics.jsonl")]
    rows = []
    for m in logged:
        row = {"iteration": m["step"], **{k: m.get(k) for k in SPLIT_KEYS}}
        parts = sum(m.get(k) or 0.0 for k in ("seconds/simulator", "seconds/policy", "seconds/rewards"))
        row["rollout_other_s"] = m["rollout_s"] - parts  # engine bookkeeping, record writes
        row["update_share"] = m["update_s"] / (m["rollout_s"] + m["update_s"])
        rows.append(row)
    rows.append({"run_total_s": total})
    return rows


def split_table(rows: list[dict]) -> str:
    lines = ["| iteration | rollout s | simulator s | policy s | rewards s | other s | update s | update share | "
             "packed tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "iteration" not in r:
            continue
        lines.append(f"| {r['iteration']} | {r['rollout_s']:.2f} | {r['seconds/simulator'] or 0:.2f} | "
                     f"{r['seconds/policy'] or 0:.2f} | {r['seconds/rewards'] or 0:.2f} | {r['rollout_other_s']:.2f} | "
                     f"{r['update_s']:.2f} | {r['update_share']:.0%} | {r['packed_tokens']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["counts", "split", "both"], default="both")
    parser.add_argument("--trees", type=int, default=8, help="synthetic rollout trees per (G, K) for the counts")
    parser.add_argument("--iterations", type=int, default=4, help="the first two compile (split)")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--group", type=int, default=HEADLINE[0])
    parser.add_argument("--turns", type=int, default=HEADLINE[1])
    parser.add_argument("--max-tokens", type=int, default=16, help="policy and simulator tokens per message (split)")
    parser.add_argument("--seq-len", type=int, default=768,
                        help="rollout row length (split): K x (user + G replies) at max_tokens, with the template")
    parser.add_argument("--out", default=None, help="folder for counts.json / split.json / *.txt")
    args = parser.parse_args()
    out = pathlib.Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    import jax

    header = (f"device: {jax.devices()[0].device_kind} x {jax.device_count()}; python {sys.version.split()[0]}, "
              f"jax {jax.__version__}")
    if args.part in ("counts", "both"):
        rows = count_tokens(args.trees)
        head = next(r for r in rows if (r["G"], r["K"]) == HEADLINE)
        verdict = (f"G={HEADLINE[0]}, K={HEADLINE[1]}: naive / packed = {head['ratio']:.2f}x "
                   f"(goal >= {GOAL:.0f}x: {'met' if head['ratio'] >= GOAL else 'missed'})")
        text = (f"{header}\n(a) tokens through the policy forward per update, SmolLM2 tokenizer, user {USER_WORDS} "
                f"words, replies {REPLY_WORDS} words, {args.trees} trees per row\n{counts_table(rows)}\n{verdict}\n")
        print(text, flush=True)
        if out:
            (out / "counts.json").write_text(json.dumps(rows, indent=1) + "\n")
            (out / "counts.txt").write_text(text)
    if args.part in ("split", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            rows = wall_split(args.iterations, args.cases, args.group, args.turns, args.max_tokens, args.seq_len,
                              pathlib.Path(tmp))
        text = (f"{header}\n(b) wall split per iteration: tiny word-level Llama (2 layers, hidden 32) as policy and "
                f"simulator, keyword judge; {args.cases} cases x G={args.group} x K={args.turns}, {args.max_tokens} "
                f"tokens per message, rows of {args.seq_len} tokens; iterations 1-2 include compilation (the "
                f"rollouts' growing prompts reach new shapes in both)\n{split_table(rows)}\n"
                f"whole run: {rows[-1]['run_total_s']:.1f} s (model load, compilation, checkpoints included)\n")
        print(text, flush=True)
        if out:
            (out / "split.json").write_text(json.dumps(rows, indent=1) + "\n")
            (out / "split.txt").write_text(text)


if __name__ == "__main__":
    from aloe_jax.core.distributed import cpu_only_without_accelerators

    cpu_only_without_accelerators("benchmark")  # as `aloe-jax` does: no libtpu probe warnings on a CPU host
    main()
