"""Per-reply log-probabilities from packed sequences, and the SFT, DPO and GRPO losses.

Losses return *sums and weights* (not means) so that gradient accumulation over micro-batches normalises once, by
the total number of target tokens (SFT) or pairs (DPO) in the whole batch.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np


def reply_sums(values: jax.Array, reply_index: jax.Array, num_replies: int) -> jax.Array:
    """`[batch, num_replies]` sum of `[batch, seq]` values over the tokens of each reply (index -1 ignored)."""
    one_hot = jax.nn.one_hot(reply_index, num_replies, dtype=values.dtype)  # [batch, seq, replies]; -1 → zeros
    return jnp.einsum("bs,bsr->br", values, one_hot)


def sft_loss(token_logps: jax.Array, target_weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of negative log-likelihood over target tokens, number of target tokens)."""
    return -jnp.sum(token_logps * target_weight), jnp.sum(target_weight)


DPOLossType = Literal["sigmoid", "ipo", "hinge"]


def dpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    pair_weight: jax.Array,
    beta: float,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(loss summed over pairs, number of pairs, metric sums) for `[pairs]` arrays; `pair_weight` 0 drops a pair.

    sigmoid: -(1-ε)·log σ(β·m) - ε·log σ(-β·m) (Rafailov et al., conservative DPO for ε > 0);
    ipo: (m - 1/(2β))² (Azar et al.); hinge: max(0, 1 - β·m) (SLiC); with m the policy-minus-reference margin of
    log-ratios. For IPO pass length-normalised log-probs, as the IPO paper and TRL do.
    """
    margin = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * margin) \
            - label_smoothing * jax.nn.log_sigmoid(-beta * margin)
    elif loss_type == "ipo":
        losses = jnp.square(margin - 1 / (2 * beta))
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * margin)
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    metrics = {
        "reward_accuracy": jnp.sum((chosen_rewards > rejected_rewards) * pair_weight),
        "chosen_reward": jnp.sum(chosen_rewards * pair_weight),
        "rejected_reward": jnp.sum(rejected_rewards * pair_weight),
        "reward_margin": jnp.sum((chosen_rewards - rejected_rewards) * pair_weight),
    }
    return jnp.sum(losses * pair_weight), jnp.sum(pair_weight), metrics


GRPOVariant = Literal["grpo", "dr_grpo"]


def group_advantages(rewards, variant: GRPOVariant = "grpo", eps: float = 1e-4) -> np.ndarray:
    """Advantages of one group of sibling candidates (`[G]` rewards, NaN for an unscored one — it gets NaN back):
    reward minus the group mean, over the group's std + `eps` for grpo (no division for dr_grpo). A group with fewer
    than two scored candidates has no baseline and gets NaN throughout (nothing to learn from it)."""
    rewards = np.asarray(rewards, np.float64)
    scored = ~np.isnan(rewards)
    if scored.sum() < 2:
        return np.full(rewards.shape, np.nan)
    centred = rewards - rewards[scored].mean()
    return centred / (rewards[scored].std() + eps) if variant == "grpo" else centred


def grpo_token_losses(logps: jax.Array, old_logps: jax.Array, ref_logps: jax.Array | None, advantages: jax.Array,
                      clip_low: float, clip_high: float, kl_coef: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token GRPO loss for arrays of the same shape: the PPO clipped surrogate −min(ρA, clip(ρ, 1−ε_low,
    1+ε_high)A) with ρ = exp(logp − old logp), plus `kl_coef` × the k3 estimate exp(r) − r − 1 of KL(policy‖ref),
    r = ref logp − logp (Schulman's unbiased, always-positive estimator). Also per token: the k3 value, whether the
    clipped term was the one taken, and ρ."""
    ratio = jnp.exp(logps - old_logps)
    unclipped, clipped = ratio * advantages, jnp.clip(ratio, 1 - clip_low, 1 + clip_high) * advantages
    loss = -jnp.minimum(unclipped, clipped)
    k3 = jnp.zeros_like(logps)
    if ref_logps is not None:
        log_ratio = ref_logps - logps
        k3 = jnp.exp(log_ratio) - log_ratio - 1
        loss = loss + kl_coef * k3
    return loss, {"kl": k3, "clipped": (clipped < unclipped).astype(jnp.float32), "ratio": ratio}
