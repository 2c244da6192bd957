"""GRPO on tree-packed rollouts: the loss and its gradients equal a naive computation that scores every candidate
reply alone after its full history (written out here from the logits, fp32), for G = 4 candidates over K = 3 turns;
the advantages, the ratio clipping and the k3 KL are the textbook ones."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aloe_jax.conversation.records import Candidate, TreeRecord, rollout_turn
from aloe_jax.models.tokenizer import encode_chat
from aloe_jax.train.config import GRPOConfig
from aloe_jax.train.inputs.batch import collate_rollouts
from aloe_jax.train.inputs.packing import pack_rollout, packed_attention_mask
from aloe_jax.train.inputs.pipeline import global_batch
from aloe_jax.train.losses import group_advantages
from aloe_jax.train.objectives import GRPO, batch_label_logprobs
from aloe_jax.train.step import StepContext, make_grad_fn
from tests.test_packing import _text
from tests.test_trainer import VOCAB, mesh_of, tiny_model

G, K, SEQ = 4, 3, 1024


def rollout_tree(seed: int) -> TreeRecord:
    """A K-turn rollout with G candidates of different lengths per turn, one unscored, continued variously."""
    rng = random.Random(seed)
    turns = []
    for k in range(K):
        rewards = [rng.choice([1.0, 2.0, 3.5, 5.0]) for _ in range(G)]
        if k == 1:
            rewards[2] = None  # no usable judge score: weight 0, not in the group's baseline
        candidates = [Candidate(text=_text(rng, rng.randint(3, 14)), reward=r) for r in rewards]
        turns.append(rollout_turn(_text(rng, 8), candidates, rng.randrange(G)))
    return TreeRecord(id=f"r{seed}", profile="p", personality="q", turns=turns)


def fold(ids):
    return [i % VOCAB for i in ids]


def perturbed(params, scale, phase):
    return jax.tree.map(lambda p: p + scale * jnp.sin(phase + jnp.arange(p.size).reshape(p.shape)), params)


def naive_sequences(tokenizer, trees, cfg: GRPOConfig):
    """One row per scored candidate: its history + reply alone (end-padded: causal attention never sees the
    padding), which positions are reply tokens, and its advantage computed here from its group's rewards."""
    rows, replies, advs = [], [], []
    for tree in trees:
        for k, turn in enumerate(tree.turns):
            rewards = np.array([np.nan if c.reward is None else c.reward for c in turn.candidates])
            scored = ~np.isnan(rewards)
            centred = rewards - rewards[scored].mean()
            adv = centred / (rewards[scored].std() + 1e-4) if cfg.variant == "grpo" else centred
            for i, cand in enumerate(turn.candidates):
                if not scored[i]:
                    continue
                ids, mask = encode_chat(tokenizer, tree.history(k) + [{"role": "assistant", "content": cand.text}])
                start = max(j for j in range(len(mask)) if mask[j] and not mask[j - 1])  # the reply: last run of 1s
                end = max(j for j in range(len(mask)) if mask[j]) + 1
                rows.append(fold(ids))
                replies.append((start, end))
                advs.append(adv[i])
    length = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), length), np.int32)
    in_reply = np.zeros((len(rows), length), np.float32)  # at position t: token t+1 is a reply token
    for n, (row, (start, end)) in enumerate(zip(rows, replies)):
        tokens[n, :len(row)] = row
        in_reply[n, start - 1:end - 1] = 1
    return jnp.asarray(tokens), jnp.asarray(in_reply), jnp.asarray(advs, jnp.float32)


def naive_loss(graphdef, params, old_params, ref_params, sequences, cfg: GRPOConfig):
    """Σ over every scored candidate, scored alone after its history, of the per-token GRPO loss, over the
    normaliser of the variant."""
    tokens, in_reply, adv = sequences
    causal = packed_attention_mask(jnp.zeros_like(tokens), jnp.zeros_like(tokens))
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

    def logps(p):
        logits, _ = nnx.merge(graphdef, p)(tokens, positions, causal)
        lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        next_ids = tokens[:, 1:]
        return jnp.pad(jnp.take_along_axis(lp, next_ids[..., None], axis=-1)[..., 0], ((0, 0), (0, 1)))

    new, old, ref = logps(params), jax.lax.stop_gradient(logps(old_params)), logps(ref_params)
    ratio = jnp.exp(new - old)
    a = adv[:, None]
    surrogate = jnp.minimum(ratio * a, jnp.clip(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high) * a)
    k3 = jnp.exp(ref - new) - (ref - new) - 1
    total = jnp.sum((-surrogate + cfg.kl_coef * k3) * in_reply)
    return total / (jnp.sum(in_reply) if cfg.variant == "grpo" else len(adv) * cfg.budget_tokens)


def packed_batch(tokenizer, trees, cfg: GRPOConfig, graphdef, old_params, mesh):
    packed = [pack_rollout(tokenizer, tree, SEQ) for tree in trees]
    advantages = []
    for tree, p in zip(trees, packed):
        per_turn = [group_advantages([np.nan if c.reward is None else c.reward for c in t.candidates], cfg.variant)
                    for t in tree.turns]
        advantages.append([per_turn[turn][cand] for turn, cand in p.replies])
    batch = collate_rollouts(packed, advantages, len(trees), SEQ, G * K)
    batch["tokens"] %= VOCAB
    batch["labels"] %= VOCAB
    host = {name: jnp.asarray(v) for name, v in batch.items()}
    batch["old_logprobs"] = np.asarray(batch_label_logprobs(graphdef, old_params, host))
    return global_batch(batch, mesh), packed


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo"])
def test_tree_packed_grpo_loss_and_gradients_equal_per_candidate_scoring(smollm2_tokenizer, variant):
    mesh = mesh_of(1, 1, 1)
    graphdef, base = nnx.split(tiny_model(mesh))
    # Policy, rollout-time policy and reference all differ, so ratios leave the clip range and k3 is not 0.
    old_params = base
    params = perturbed(base, 0.05, 0.0)
    ref_params = perturbed(base, 0.03, 1.0)
    cfg = GRPOConfig(variant=variant, kl_coef=0.1, clip_low=0.2, clip_high=0.28, budget_tokens=16)
    trees = [rollout_tree(0), rollout_tree(1)]
    batch, packed = packed_batch(smollm2_tokenizer, trees, cfg, graphdef, old_params, mesh)
    assert all(len(p.replies) == G * K for p in packed)  # every candidate is a reply of the packed row

    grads, metrics = jax.jit(make_grad_fn(StepContext(graphdef, GRPO(cfg), 1, mesh)))(params, ref_params, batch)
    sequences = naive_sequences(smollm2_tokenizer, trees, cfg)
    want_loss, want_grads = jax.jit(jax.value_and_grad(
        lambda p: naive_loss(graphdef, p, old_params, ref_params, sequences, cfg)))(params)
    assert abs(float(metrics["loss"]) - float(want_loss)) <= 1e-4 * max(1.0, abs(float(want_loss)))
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    assert 0 < float(metrics["clip_fraction"]) / float(metrics["reply_tokens"]) < 1  # clipping was exercised
    assert float(metrics["kl"]) > 0


def test_at_the_rollout_policy_the_ratio_is_one_and_the_loss_is_minus_mean_advantage(smollm2_tokenizer):
    """With params == rollout-time params and no KL, ρ = 1: the grpo loss is −Σ A·tokens / tokens, and its gradient
    is the REINFORCE gradient −Σ A ∇logp / tokens (so a negated reward flips it)."""
    mesh = mesh_of(1, 1, 1)
    graphdef, params = nnx.split(tiny_model(mesh))
    cfg = GRPOConfig(kl_coef=0.0)
    trees = [rollout_tree(2)]
    batch, packed = packed_batch(smollm2_tokenizer, trees, cfg, graphdef, params, mesh)
    grad_fn = jax.jit(make_grad_fn(StepContext(graphdef, GRPO(cfg), 1, mesh)))
    grads, metrics = grad_fn(params, None, batch)
    assert abs(float(metrics["ratio"]) - 1.0) < 1e-5 and float(metrics["clip_fraction"]) == 0
    host = jax.device_get(batch)
    idx = host["reply_index"][0]
    adv = np.where(idx >= 0, host["reply_advantage"][0][np.maximum(idx, 0)] * host["reply_weight"][0][np.maximum(idx, 0)], 0)
    weight = np.where(idx >= 0, host["reply_weight"][0][np.maximum(idx, 0)], 0)
    assert abs(float(metrics["loss"]) - (-adv.sum() / weight.sum())) < 1e-5
    flipped = dict(batch, reply_advantage=-batch["reply_advantage"])
    neg_grads, _ = grad_fn(params, None, flipped)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(neg_grads)):
        np.testing.assert_allclose(np.asarray(a), -np.asarray(b), rtol=1e-5, atol=1e-7)


def test_group_advantages():
    np.testing.assert_allclose(group_advantages([1, 3], "grpo"), [-1 / (1 + 1e-4), 1 / (1 + 1e-4)])
    np.testing.assert_allclose(group_advantages([1, 3, np.nan], "dr_grpo")[:2], [-1, 1])
    assert np.isnan(group_advantages([1, 3, np.nan])[2])
    assert np.isnan(group_advantages([2, np.nan])).all()  # one scored candidate: no baseline, nothing to learn
    np.testing.assert_allclose(group_advantages([4, 4, 4]), [0, 0, 0])


def _grpo_losses(tokenizer, mesh_shape, tmp_path, steps=5):
    from aloe_jax.train.trainer import Trainer
    from tests.test_trainer import train_config

    mesh = mesh_of(*mesh_shape)
    cfg = train_config(tmp_path, objective="grpo")
    cfg.grpo.kl_coef = 0.04
    trainer = Trainer(cfg, tiny_model(mesh), mesh, total_steps=steps)
    state = trainer.init_state()
    host_batches = []
    for b in range(3):
        trees = [rollout_tree(10 * b + i) for i in range(8)]
        packed = [pack_rollout(tokenizer, tree, SEQ) for tree in trees]
        adv = [[group_advantages([np.nan if c.reward is None else c.reward
                                  for c in tree.turns[turn].candidates])[cand] for turn, cand in p.replies]
               for tree, p in zip(trees, packed)]
        batch = collate_rollouts(packed, adv, 8, SEQ, G * K)
        batch["tokens"] %= VOCAB
        batch["labels"] %= VOCAB
        host_batches.append(batch)
    out = []
    for i in range(steps):
        batch = global_batch({k: v for k, v in host_batches[i % 3].items()}, mesh)
        batch["old_logprobs"] = trainer.label_logprobs(state.params, batch)  # on-policy: ρ = 1 at each step
        state, metrics = trainer.step(state, batch)
        out.append(float(metrics["loss"]))
    return out


def test_grpo_loss_trajectory_agrees_across_meshes(smollm2_tokenizer, tmp_path):
    reference = _grpo_losses(smollm2_tokenizer, (1, 1, 1), tmp_path)
    assert len(set(reference)) == 5  # the policy moves, so every step's loss differs
    for shape in [(8, 1, 1), (2, 2, 2)]:
        np.testing.assert_allclose(_grpo_losses(smollm2_tokenizer, shape, tmp_path), reference, rtol=2e-5,
                                   atol=1e-6, err_msg=str(shape))
