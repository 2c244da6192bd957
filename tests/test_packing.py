"""Tree packing: one forward pass over the packed sequence gives every reply's log-probability exactly as scoring
each reply alone after its full history would (fp32), and targets cover replies and nothing else."""

import random

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aloe_jax.train.inputs.batch import collate
from aloe_jax.train.inputs.packing import pack_tree, packed_attention_mask
from aloe_jax.conversation.records import TreeRecord, Turn, parse_tree
from aloe_jax.core.errors import DataError
from aloe_jax.models.tokenizer import encode_chat
from aloe_jax.models.decoder import logprobs_of_labels
from aloe_jax.train.losses import reply_sums

WORDS = "hiking vegan coffee guitar cats yoga painting travel quiet curious planner anxious bold the a is and".split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, n))).capitalize() + "."


def make_tree(seed: int, turns: int = 10, system: str | None = None) -> TreeRecord:
    """A random 10-turn tree whose continued reply varies per turn."""
    rng = random.Random(seed)
    return TreeRecord(id=f"t{seed}", profile="p", personality="q", system=system, turns=[
        Turn(user=_text(rng, 12), preferred=_text(rng, 20), rejected=_text(rng, 20),
             continued=rng.choice(["preferred", "rejected"])) for _ in range(turns)])


@nnx.jit
def _packed_reply_logps(model, tokens, positions, segment, visible_prefix, labels, reply_index):
    """`[batch, 20]` summed log-probs of every reply from one packed forward pass."""
    logits, _ = model(tokens, positions, packed_attention_mask(segment, visible_prefix))
    return reply_sums(logprobs_of_labels(logits, labels), reply_index, 20)


def _forward(model, packed_list, pad_id=0):
    length = max(len(p) for p in packed_list)
    def pad(name, fill):
        out = np.full((len(packed_list), length), fill, np.int32)
        for i, p in enumerate(packed_list):
            out[i, :len(p)] = getattr(p, name)
        return jnp.asarray(out)
    assert max(len(p.replies) for p in packed_list) == 20
    return np.asarray(_packed_reply_logps(model, pad("tokens", pad_id), pad("positions", 0), pad("segment", -1),
                                          pad("visible_prefix", 0), pad("labels", 0), pad("reply_index", -1)))


NAIVE_BUCKET = 128  # naive sequences are right-padded to a multiple of this, so the forward compiles a few times only


@nnx.jit
def _causal_logprobs(model, tokens):
    """`[1, len - 1]` log p(next token) of a plain causal forward; end padding is invisible to earlier tokens."""
    n = tokens.shape[1]
    logits, _ = model(tokens, jnp.arange(n)[None], jnp.tril(jnp.ones((n, n), bool))[None])
    return logprobs_of_labels(logits[:, :-1], tokens[:, 1:])


def _naive(model, tokenizer, tree: TreeRecord, turn: int, kind: str) -> float:
    """Log-probability of one reply scored alone after its full history."""
    messages = tree.history(turn) + [{"role": "assistant", "content": tree.turns[turn].reply(kind)}]
    ids, mask = encode_chat(tokenizer, messages)
    n = len(ids)
    padded = -(-n // NAIVE_BUCKET) * NAIVE_BUCKET
    logps = np.asarray(_causal_logprobs(model, jnp.asarray([ids + [0] * (padded - n)])))[0]
    last_reply_start = max(i for i in range(n) if mask[i] and not mask[i - 1])  # earlier replies are history
    return float(sum(logps[i - 1] for i in range(last_reply_start, n) if mask[i]))


def test_packed_logprobs_equal_naive_for_every_reply(tiny_chat_engine):
    model, tokenizer = tiny_chat_engine.model, tiny_chat_engine.tokenizer
    trees = [make_tree(1), make_tree(2, system="Be kind.")]
    packed = [pack_tree(tokenizer, t, max_len=4096) for t in trees]
    assert all(len(p.replies) == 20 and p.turns_cut == 0 for p in packed)
    ours = _forward(model, packed)
    for b, (tree, p) in enumerate(zip(trees, packed)):
        for r, (turn, kind) in enumerate(p.replies):
            assert abs(ours[b, r] - _naive(model, tokenizer, tree, turn, kind)) <= 1e-4, (b, turn, kind)


def test_targets_are_exactly_the_replies_with_their_end_token(tiny_chat_engine):
    tokenizer = tiny_chat_engine.tokenizer
    tree = make_tree(3, turns=4)
    p = pack_tree(tokenizer, tree, max_len=4096)
    for r, (turn, kind) in enumerate(p.replies):
        target_ids = p.labels[p.reply_index == r].tolist()
        assert tokenizer.decode(target_ids) == tree.turns[turn].reply(kind) + "<|im_end|>"
    # Nothing else is a target: every scored token belongs to some reply.
    assert (p.reply_index >= 0).sum() == sum(len(tokenizer.encode(tree.turns[t].reply(k) + "<|im_end|>"))
                                            for t, k in p.replies)


def test_long_trees_are_cut_at_turn_boundaries(tiny_chat_engine):
    tokenizer = tiny_chat_engine.tokenizer
    tree = make_tree(4, turns=10)
    full = pack_tree(tokenizer, tree, max_len=100_000)
    cut = pack_tree(tokenizer, tree, max_len=len(full) // 2)
    assert 0 < cut.turns_cut < 10 and len(cut) <= len(full) // 2
    assert len(cut.replies) == 2 * (10 - cut.turns_cut)
    assert pack_tree(tokenizer, tree, max_len=8) is None


def test_attention_mask_shape_of_a_branch():
    # spine of 4 tokens, branch 1 (segment 1) of 3 tokens branching after spine token 1, one padding token.
    segment = jnp.asarray([[0, 0, 0, 0, 1, 1, 1, -1]])
    prefix = jnp.asarray([[0, 0, 0, 0, 1, 1, 1, 0]])
    mask = np.asarray(packed_attention_mask(segment, prefix))[0].astype(int)
    assert mask[3].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]  # spine: causal, never sees branches
    assert mask[4].tolist() == [1, 0, 0, 0, 1, 0, 0, 0]  # copied prompt token: spine before it, then itself
    assert mask[6].tolist() == [1, 0, 0, 0, 1, 1, 1, 0]
    assert mask[7].sum() == 0


def test_malformed_record_is_a_clear_error():
    with pytest.raises(DataError, match=r"line 3: turns\.0\.preferred"):
        parse_tree('{"id": "x", "turns": [{"user": "hi", "rejected": "no"}]}', where="line 3")


def test_sft_weight_is_exactly_the_judged_preferred_replies_of_a_ten_turn_tree(tiny_chat_engine):
    tokenizer = tiny_chat_engine.tokenizer
    tree = make_tree(5, turns=10, system="Be brief.")
    assert {t.continued for t in tree.turns} == {"preferred", "rejected"}  # preferred replies on spine and branches
    unjudged = {2, 7}
    for k in unjudged:
        tree.turns[k].judged = False
    p = pack_tree(tokenizer, tree, max_len=4096)
    batch = collate([p, None], rows=2, seq_len=len(p) + 16, max_pairs=10)
    weight, labels = batch["sft_weight"][0], batch["labels"][0]
    assert set(np.unique(batch["sft_weight"]).tolist()) <= {0.0, 1.0} and batch["sft_weight"][1].sum() == 0
    targets = [r for r, (turn, kind) in enumerate(p.replies) if kind == "preferred" and turn not in unjudged]
    assert len(targets) == 8
    for r in targets:
        turn = p.replies[r][0]
        span = batch["reply_index"][0] == r
        assert weight[span].min() == 1
        assert tokenizer.decode(labels[span].tolist()) == tree.turns[turn].preferred + "<|im_end|>"
    # Counted from the texts alone: nothing of user turns, system prompt, rejected or unjudged replies is a target.
    expected = sum(len(tokenizer.encode(tree.turns[k].preferred + "<|im_end|>"))
                   for k in range(10) if k not in unjudged)
    assert weight.sum() == expected
    assert np.all(weight[~np.isin(batch["reply_index"][0], targets)] == 0)
    assert batch["pair_weight"][0].tolist() == [0.0 if k in unjudged else 1.0 for k in range(10)]


@nnx.jit
def _sft_target_logp(model, batch):
    """Σ log p over the SFT targets of each row, from one packed forward pass."""
    logits, _ = model(batch["tokens"], batch["positions"], packed_attention_mask(batch["segment"],
                                                                                 batch["visible_prefix"]))
    return jnp.sum(logprobs_of_labels(logits, batch["labels"]) * batch["sft_weight"], axis=1)


def test_sft_packing_leaves_out_rejected_branches_and_keeps_every_target(tiny_chat_engine):
    model, tokenizer = tiny_chat_engine.model, tiny_chat_engine.tokenizer
    tree = make_tree(6, turns=10)
    tree.turns[4].judged = False
    preferred_on_branch = [k for k, t in enumerate(tree.turns) if t.continued == "rejected"]
    assert preferred_on_branch and len(preferred_on_branch) < 10  # preferred replies both on the spine and on branches
    full = pack_tree(tokenizer, tree, max_len=4096)
    sft = pack_tree(tokenizer, tree, max_len=4096, rejected_branches=False)
    # Every preferred reply stays; a rejected reply stays only where it continued the chat (it is on the spine).
    assert sorted(sft.replies) == sorted([(k, "preferred") for k in range(10)] + [(k, "rejected") for k in preferred_on_branch])
    dropped = sum(len(tokenizer.encode(tree.turns[k].rejected + "<|im_end|>")) + 1
                  for k in range(10) if k not in preferred_on_branch)
    assert len(sft) == len(full) - dropped
    seq_len = len(full) + 8
    batches = [collate([p], rows=1, seq_len=seq_len, max_pairs=10) for p in (full, sft)]
    assert batches[0]["sft_weight"].sum() == batches[1]["sft_weight"].sum() > 0
    # Pairs survive only where both replies are packed (the rejected one continued the chat).
    assert batches[1]["pair_weight"].sum() == len(preferred_on_branch) - (4 in preferred_on_branch)
    logps = [float(_sft_target_logp(model, {k: jnp.asarray(v) for k, v in b.items()})[0]) for b in batches]
    assert abs(logps[0] - logps[1]) <= 1e-4 * abs(logps[0])
