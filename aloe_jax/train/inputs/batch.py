"""Packed trees → fixed-shape host batches: the one contract between the data pipeline and the trainer.

Every batch is a dict of numpy arrays with a static shape, so the jit'd step compiles once:

    tokens, positions, segment, visible_prefix, labels, reply_index   int32   [rows, seq_len]
    sft_weight                                                          float32 [rows, seq_len]  1 on preferred
                                                                                 replies' target tokens (judged turns)
    pair_chosen, pair_rejected                                          int32   [rows, max_pairs] reply indices
    pair_weight                                                         float32 [rows, max_pairs] 1 for a real pair

RL rollout rows (`collate_rollouts`) carry, instead of the pair fields,

    reply_advantage, reply_weight                                       float32 [rows, max_replies] per reply: its
                                                                                 advantage, 1 when it has one

Reply indices are per row and < 2·max_pairs, so `losses.reply_sums(..., num_replies=2 * max_pairs)` followed by a
gather with `pair_chosen` / `pair_rejected` yields per-pair log-probs. Padding rows (a short last batch) and padding
tokens have segment -1 and zero weights: they cost compute and change no number.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aloe_jax.train.inputs.packing import PackedTree
from aloe_jax.core.errors import DataError

TOKEN_FIELDS = ("tokens", "positions", "segment", "visible_prefix", "labels", "reply_index")
_TOKEN_FILL = {"tokens": 0, "positions": 0, "segment": -1, "visible_prefix": 0, "labels": 0, "reply_index": -1}


def collate(trees: Sequence[PackedTree | None], rows: int, seq_len: int, max_pairs: int, pad_id: int = 0) -> dict:
    """A batch of `rows` rows from up to `rows` packed trees (None or missing rows are padding)."""
    if len(trees) > rows:
        raise ValueError(f"{len(trees)} trees do not fit in {rows} rows")
    batch = {name: np.full((rows, seq_len), _TOKEN_FILL[name], np.int32) for name in TOKEN_FIELDS}
    batch["tokens"][:] = pad_id
    batch["sft_weight"] = np.zeros((rows, seq_len), np.float32)
    batch["pair_chosen"] = np.zeros((rows, max_pairs), np.int32)
    batch["pair_rejected"] = np.zeros((rows, max_pairs), np.int32)
    batch["pair_weight"] = np.zeros((rows, max_pairs), np.float32)
    for row, tree in enumerate(trees):
        if tree is None:
            continue
        n = len(tree)
        if n > seq_len:
            raise DataError(f"a packed tree of {n} tokens does not fit seq_len={seq_len}")
        for name in TOKEN_FIELDS:
            batch[name][row, :n] = getattr(tree, name)
        index = {(turn, kind): r for r, (turn, kind) in enumerate(tree.replies)}
        turns = sorted({turn for turn, _ in tree.replies})
        if len(turns) > max_pairs:
            raise DataError(f"a packed tree with {len(turns)} turns exceeds max_pairs={max_pairs}")
        for p, turn in enumerate(turns):
            chosen, rejected = index[(turn, "preferred")], index.get((turn, "rejected"))
            if tree.judged[turn]:
                batch["sft_weight"][row, :n] += tree.reply_index == chosen
            if rejected is None:  # packed for SFT without its rejected branch: no pair
                continue
            batch["pair_chosen"][row, p] = chosen
            batch["pair_rejected"][row, p] = rejected
            if tree.judged[turn]:
                batch["pair_weight"][row, p] = 1.0
    return batch


def collate_rollouts(trees: Sequence[PackedTree | None], advantages: Sequence[Sequence[float]], rows: int,
                     seq_len: int, max_replies: int, pad_id: int = 0) -> dict:
    """A batch of `rows` rows from packed rollout trees (`packing.pack_rollout`) and each tree's per-reply
    advantages (`advantages[i][r]` for reply r of tree i; NaN = no advantage, weight 0)."""
    batch = collate([], rows, seq_len, 0, pad_id)
    del batch["sft_weight"], batch["pair_chosen"], batch["pair_rejected"], batch["pair_weight"]
    batch["reply_advantage"] = np.zeros((rows, max_replies), np.float32)
    batch["reply_weight"] = np.zeros((rows, max_replies), np.float32)
    if len(trees) > rows:
        raise ValueError(f"{len(trees)} trees do not fit in {rows} rows")
    for row, (tree, values) in enumerate(zip(trees, advantages)):
        if tree is None:
            continue
        n = len(tree)
        if n > seq_len:
            raise DataError(f"a packed tree of {n} tokens does not fit seq_len={seq_len}")
        if len(tree.replies) > max_replies:
            raise DataError(f"a packed rollout with {len(tree.replies)} replies exceeds max_replies={max_replies}")
        for name in TOKEN_FIELDS:
            batch[name][row, :n] = getattr(tree, name)
        values = np.asarray(values, np.float64)[:len(tree.replies)]
        known = ~np.isnan(values)
        batch["reply_advantage"][row, :len(values)] = np.where(known, values, 0.0)
        batch["reply_weight"][row, :len(values)] = known
    return batch
