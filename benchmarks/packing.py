"""Tree packing vs naive per-pair scoring: the log-probs of every preferred and rejected reply of 10-turn trees, on
SmolLM2-135M-Instruct (fp32, CPU unless an accelerator is present).

Naive: each reply scored after its full history, one sequence per reply (2 per turn), micro-batched by length
(padded to a multiple of 256, as a per-pair trainer would). Packed: one sequence per tree (docs/DESIGN.md §3). Both sides are
jit-compiled and warmed up on every shape before timing; the printout also gives the largest |Δ log-prob| between
the two, which must be float noise.

    python -m benchmarks.packing [--trees 1] [--turns 10] [--micro-batch 4] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("I really enjoy long walks with my dog and cooking spicy food after work but my schedule as a nurse makes "
         "it hard to plan anything so quick tips that fit a busy week would help a lot thanks for the idea maybe "
         "try to keep it simple and cheap because money is tight this month").split()
BUCKET = 256  # naive lengths are padded to a multiple of this: few shapes to compile, little padding


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def make_trees(count: int, turns: int, seed: int = 0):
    """Random trees with ALOE-like lengths: short user turns, replies of a few sentences."""
    from aloe_jax.conversation.records import TreeRecord, Turn

    rng = random.Random(seed)
    return [TreeRecord(id=f"bench{i}", turns=[
        Turn(user=_text(rng, 20), preferred=_text(rng, 45), rejected=_text(rng, 45),
             continued=rng.choice(["preferred", "rejected"])) for _ in range(turns)]) for i in range(count)]


def _pad_to(n: int) -> int:
    return -(-n // BUCKET) * BUCKET


def _timed(fn, repeats: int, warm_up: bool = True) -> tuple[float, object]:
    """(best wall seconds, last result) of `fn()`, after one untimed call if `warm_up`."""
    result = fn() if warm_up else None
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", type=int, default=1)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--micro-batch", type=int, default=4, help="naive sequences per forward pass")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from aloe_jax.train.inputs.batch import collate
    from aloe_jax.train.inputs.packing import pack_tree, packed_attention_mask
    from aloe_jax.models.loader import load_model
    from aloe_jax.models.tokenizer import encode_chat
    from aloe_jax.models.decoder import logprobs_of_labels
    from aloe_jax.train.losses import reply_sums

    model, tokenizer = load_model(None)
    trees = make_trees(args.trees, args.turns)
    num_replies = 2 * args.turns

    @nnx.jit
    def packed_forward(model, b):
        logits, _ = model(b["tokens"], b["positions"], packed_attention_mask(b["segment"], b["visible_prefix"]))
        return reply_sums(logprobs_of_labels(logits, b["labels"]), b["reply_index"], num_replies)

    @nnx.jit
    def causal_forward(model, tokens, target_mask):
        n = tokens.shape[1]
        logits, _ = model(tokens, jnp.broadcast_to(jnp.arange(n), tokens.shape), jnp.tril(jnp.ones((n, n), bool))[None])
        return jnp.sum(logprobs_of_labels(logits[:, :-1], tokens[:, 1:]) * target_mask[:, 1:], axis=1)

    packed = [pack_tree(tokenizer, t, max_len=1 << 16) for t in trees]
    seq_len = _pad_to(max(len(p) for p in packed))
    host_batch = collate(packed, len(packed), seq_len, args.turns, tokenizer.pad_token_id)
    batch = {k: jnp.asarray(v) for k, v in host_batch.items()}
    packed_s, packed_out = _timed(lambda: jax.block_until_ready(packed_forward(model, batch)), args.repeats)
    packed_logps = {(i, *p.replies[r]): float(packed_out[i, r])
                    for i, p in enumerate(packed) for r in range(num_replies)}

    # Naive: one sequence per reply; the target mask keeps only the last assistant reply.
    sequences = []
    for i, tree in enumerate(trees):
        for turn in range(args.turns):
            for kind in ("preferred", "rejected"):
                messages = tree.history(turn) + [{"role": "assistant", "content": tree.turns[turn].reply(kind)}]
                ids, mask = encode_chat(tokenizer, messages)
                start = max(j for j in range(1, len(ids)) if mask[j] and not mask[j - 1])
                sequences.append(((i, turn, kind), ids, [int(j >= start and mask[j]) for j in range(len(ids))]))
    sequences.sort(key=lambda s: len(s[1]))
    micro = [sequences[j:j + args.micro_batch] for j in range(0, len(sequences), args.micro_batch)]

    def pad_micro(group):
        length = _pad_to(max(len(ids) for _, ids, _ in group))
        tokens = np.full((len(group), length), tokenizer.pad_token_id, np.int32)
        target = np.zeros((len(group), length), np.float32)
        for row, (_, ids, mask) in enumerate(group):
            tokens[row, :len(ids)], target[row, :len(ids)] = ids, mask
        return jnp.asarray(tokens), jnp.asarray(target)

    inputs = [pad_micro(g) for g in micro]
    for shape in {t.shape: (t, m) for t, m in inputs}.values():  # compile every shape before timing
        jax.block_until_ready(causal_forward(model, *shape))
    naive_s, naive_out = _timed(lambda: [jax.block_until_ready(causal_forward(model, t, m)) for t, m in inputs],
                                args.repeats, warm_up=False)
    naive_logps = {key: float(v) for g, out in zip(micro, naive_out) for (key, _, _), v in zip(g, np.asarray(out))}

    delta = max(abs(packed_logps[k] - naive_logps[k]) for k in naive_logps)
    naive_real = sum(len(ids) for _, ids, _ in sequences)
    naive_padded = sum(int(np.prod(t.shape)) for t, _ in inputs)
    packed_real = sum(len(p) for p in packed)
    print(f"device: {jax.devices()[0].device_kind}; {args.trees} tree(s) x {args.turns} turns, SmolLM2-135M fp32")
    print(f"naive : {len(sequences)} sequences in {len(inputs)} forward passes, {naive_real} tokens "
          f"({naive_padded} with padding), {naive_s:.2f} s")
    print(f"packed: {len(packed)} sequences in 1 forward pass, {packed_real} tokens "
          f"({len(packed) * seq_len} with padding), {packed_s:.2f} s")
    print(f"ratio naive/packed: tokens {naive_real / packed_real:.1f}x, wall time {naive_s / packed_s:.1f}x; "
          f"max |Δ log-prob| {delta:.2e}")


if __name__ == "__main__":
    from aloe_jax.core.distributed import cpu_only_without_accelerators

    cpu_only_without_accelerators("benchmark")  # as `aloe-jax` does: no libtpu probe warnings on a CPU host
    main()
