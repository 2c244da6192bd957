"""Tree packing: one sequence per conversation holding the spine and every side branch, so one forward pass scores
every preferred and rejected reply, each conditioned on its true history (docs/DESIGN.md §3).

Layout of a packed sequence:

    [ spine: system? user1 reply1 user2 reply2 ... userK replyK ][ branch 1 ][ branch 2 ] ... [ branch K ]

A branch holds a reply of turn k that did *not* continue the conversation, preceded by a copy of the last prompt
token of turn k (same token, same position, same visible context, hence the same hidden state as in the spine): its
logits predict the branch reply's first token, which the spine position cannot also predict. A branch token sees the
spine up to (not including) that prompt token, plus the earlier tokens of its own branch; its positions continue
from the branch point. Nothing attends to a branch except the branch itself. A preference tree has one branch per
turn (the reply of the pair that did not continue); an RL rollout tree has G - 1 (`pack_rollout`: every sampled
candidate but the continued one), so all G × K candidates are scored in one pass, each after its true history.

SFT trains on preferred replies only, so it packs with `rejected_branches=False`: a branch holding a rejected reply
costs compute and teaches nothing. Leaving it out shortens 10-turn ALOE-like rows by 21% when the chat continued with
a random reply of each pair and by 37% when it always continued with the preferred one (benchmarks/packing.py trees).
A preferred reply that sits on a branch, because the rejected one continued the chat, is kept.

Per token we keep `segment` (0 spine, n for the n-th branch, -1 padding) and `visible_prefix` (how many spine tokens a branch
token sees); the `[seq, seq]` attention mask is built from these on device, so batches stay small on the host.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp
import numpy as np

from aloe_jax.conversation.records import TreeRecord
from aloe_jax.core.errors import DataError
from aloe_jax.models.attention import TreeMask, dense_tree_mask
from aloe_jax.models.tokenizer import encode_chat

ReplyKind = Literal["preferred", "rejected"]


@dataclasses.dataclass
class PackedTree:
    """One conversation as a packed sequence. Arrays are `[length]`; `replies[r]` = (turn, kind) of reply r."""

    tokens: np.ndarray  # int32 input ids
    positions: np.ndarray  # int32 RoPE positions
    segment: np.ndarray  # int32: 0 spine, k+1 side branch of turn k
    visible_prefix: np.ndarray  # int32: spine tokens a branch token sees (0 on the spine)
    labels: np.ndarray  # int32: the token each position predicts (0 where none)
    reply_index: np.ndarray  # int32: which reply the label belongs to, -1 for none
    replies: list[tuple[int, ReplyKind | int]]  # (turn, kind) of a preference tree; (turn, candidate) of a rollout
    judged: list[bool]  # per kept turn: whether the pair has a real verdict
    turns_cut: int  # turns dropped to fit max_len

    def __len__(self) -> int:
        return len(self.tokens)


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _branch(tokenizer, tree: TreeRecord, turn: int, reply: str, spine_ids: list[int], reply_start: int) -> list[int]:
    """`reply` to `turn` as token ids (with its end-of-turn token), checked to continue the spine's prefix."""
    messages = tree.history(turn) + [{"role": "assistant", "content": reply}]
    ids, mask = encode_chat(tokenizer, messages)
    start, end = _runs(mask)[-1]
    if ids[:start] != spine_ids[:reply_start]:
        # Happens with templates that re-render history depending on what follows (Mistral's system message).
        raise DataError(
            f"tree {tree.id!r}, turn {turn}: the chat template renders the history differently depending on the "
            "reply that follows, so the tree cannot be packed; drop the system message or use another template"
        )
    return ids[start:end]


def _pack(tokenizer, tree: TreeRecord, spine_keys: list, side_replies: list[list[tuple]], max_len: int,
          judged: list[bool]) -> PackedTree | None:
    """The spine of `tree` (turn k's continued reply keyed `spine_keys[k]`) plus, per turn k, a side branch for each
    (key, text) of `side_replies[k]`, cut at turn boundaries to fit `max_len`; None if not even one turn fits."""
    spine_ids, spine_mask = encode_chat(tokenizer, tree.spine())
    spans = _runs(spine_mask)  # [start, end) of each spine reply, in turn order
    branches = [[(key, _branch(tokenizer, tree, k, text, spine_ids, spans[k][0])) for key, text in side]
                for k, side in enumerate(side_replies)]
    kept = len(tree.turns)
    # Spine up to the end of reply k, plus one copied prompt token and the reply for each branch.
    while kept and spans[kept - 1][1] + sum(1 + len(b) for side in branches[:kept] for _, b in side) > max_len:
        kept -= 1
    if kept == 0:
        return None
    spine_len = spans[kept - 1][1]
    tokens, positions = list(spine_ids[:spine_len]), list(range(spine_len))
    segment, prefix = [0] * spine_len, [0] * spine_len
    labels = spine_ids[1:spine_len] + [0]
    reply_index = [-1] * spine_len
    replies: list[tuple] = []
    for k in range(kept):
        start, end = spans[k]
        replies.append((k, spine_keys[k]))
        reply_index[start - 1:end - 1] = [len(replies) - 1] * (end - start)
        for key, reply in branches[k]:
            branch = [spine_ids[start - 1]] + reply
            replies.append((k, key))
            tokens += branch
            positions += list(range(start - 1, start - 1 + len(branch)))
            segment += [max(segment) + 1] * len(branch)  # every branch a segment of its own
            prefix += [start - 1] * len(branch)
            labels += branch[1:] + [0]
            reply_index += [len(replies) - 1] * (len(branch) - 1) + [-1]
    as_array = lambda xs: np.asarray(xs, np.int32)  # noqa: E731
    return PackedTree(as_array(tokens), as_array(positions), as_array(segment), as_array(prefix), as_array(labels),
                      as_array(reply_index), replies, judged[:kept], len(tree.turns) - kept)


def pack_tree(tokenizer, tree: TreeRecord, max_len: int, rejected_branches: bool = True) -> PackedTree | None:
    """The packed sequence of a tree, cut at turn boundaries to fit `max_len`; None if not even one turn fits.
    With `rejected_branches=False` (SFT), side branches holding a rejected reply are left out."""
    side = [[(t.side, t.reply(t.side))] if rejected_branches or t.side == "preferred" else [] for t in tree.turns]
    return _pack(tokenizer, tree, [t.continued for t in tree.turns], side, max_len, [t.judged for t in tree.turns])


def pack_rollout(tokenizer, tree: TreeRecord, max_len: int) -> PackedTree | None:
    """The packed sequence of an RL rollout tree: every turn's G candidates, the continued one on the spine and the
    others as side branches of the same history; `replies[r]` = (turn, candidate index). Cut at turn boundaries to
    fit `max_len`; None if not even one turn fits."""
    if any(t.candidates is None for t in tree.turns):
        raise DataError(f"tree {tree.id!r} is not an RL rollout (a turn without candidates)")
    side = [[(i, c.text) for i, c in enumerate(t.candidates) if i != t.continued_candidate] for t in tree.turns]
    return _pack(tokenizer, tree, [t.continued_candidate for t in tree.turns], side, max_len,
                 [True] * len(tree.turns))


def packed_attention_mask(segment: jnp.ndarray, visible_prefix: jnp.ndarray) -> jnp.ndarray:
    """`[batch, seq, seq]` bool from `[batch, seq]` segments: spine causal; a branch token sees the spine before its
    branch point and its own branch up to itself; padding (segment -1) is seen by nobody. The definition lives in
    aloe_jax/models/attention.py (TreeMask), where blockwise attention builds it per block."""
    return dense_tree_mask(TreeMask(segment, visible_prefix))
