"""DPO losses and metrics from one tree-packed forward pass of our JAX decoder equal an independent reference:
transformers' PyTorch model on the same weights, every reply scored alone after its full history, and the DPO
formulas written out in torch here."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aloe_jax.train.inputs.batch import collate
from aloe_jax.train.inputs.packing import pack_tree, packed_attention_mask
from aloe_jax.models.config import read_hf_config
from aloe_jax.models.weights import load_hf_model
from aloe_jax.models.tokenizer import encode_chat
from aloe_jax.models.decoder import logprobs_of_labels
from aloe_jax.train.losses import dpo_loss, reply_sums, sft_loss
from tests import tiny_models
from tests.test_packing import make_tree

MAX_PAIRS = 5
SEQ_LEN = 640


def _save_policy_and_reference(folder, vocab_size: int):
    """A tiny random SmolLM2-shaped torch model (the reference policy) and a perturbed copy (the policy), saved."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_models.hf_config("smollm2")
    config.vocab_size, config.max_position_embeddings = vocab_size, 2048
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder / "reference")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(folder / "policy")
    return folder / "policy", folder / "reference"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_tokenizer):
    """Trees (one pair unjudged), the collated batch, and both models' folders."""
    tok = smollm2_tokenizer
    policy_dir, reference_dir = _save_policy_and_reference(tmp_path_factory.mktemp("dpo"), len(tok))
    trees = [make_tree(11, turns=MAX_PAIRS, system="Answer briefly."), make_tree(12, turns=4)]
    trees[1].turns[2].judged = False
    batch = collate([pack_tree(tok, t, SEQ_LEN) for t in trees], rows=3, seq_len=SEQ_LEN, max_pairs=MAX_PAIRS,
                    pad_id=tok.pad_token_id)
    return tok, trees, batch, policy_dir, reference_dir


@nnx.jit
def _packed_logps(model, b):
    """`[rows, seq]` log p(label) and `[rows, 2·max_pairs]` per-reply sums and token counts from one packed forward."""
    logits, _ = model(b["tokens"], b["positions"], packed_attention_mask(b["segment"], b["visible_prefix"]))
    logps = logprobs_of_labels(logits, b["labels"])
    sums = reply_sums(logps, b["reply_index"], 2 * MAX_PAIRS)
    return logps, sums, reply_sums(jnp.ones_like(logps), b["reply_index"], 2 * MAX_PAIRS)


def _packed_pair_stats(folder, batch) -> dict[str, np.ndarray]:
    """Per-pair (chosen, rejected) summed log-probs and token counts, `[rows, max_pairs]`, from one packed forward."""
    model = load_hf_model(str(folder), read_hf_config(str(folder)))
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    logps, sums, counts = _packed_logps(model, b)
    pick = lambda values, index: np.asarray(jnp.take_along_axis(values, b[index], axis=1))  # noqa: E731
    return {"chosen": pick(sums, "pair_chosen"), "rejected": pick(sums, "pair_rejected"),
            "chosen_len": pick(counts, "pair_chosen"), "rejected_len": pick(counts, "pair_rejected"),
            "logps": np.asarray(logps)}


def _naive_reply_logps(model, tok, tree, turn: int, kind: str) -> tuple[float, int]:
    """(summed log-prob, token count) of one reply scored alone after its history, with the PyTorch model."""
    import torch

    messages = tree.history(turn) + [{"role": "assistant", "content": tree.turns[turn].reply(kind)}]
    ids, mask = encode_chat(tok, messages)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logps = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    # The reply is the last assistant span; earlier spans are history.
    start = max(i for i in range(1, len(ids)) if mask[i] and not mask[i - 1])
    targets = [i for i in range(start, len(ids)) if mask[i]]
    return float(sum(logps[i - 1] for i in targets)), len(targets)


@pytest.fixture(scope="module")
def naive(setup):
    """Per judged pair, in tree/turn order: policy and reference (chosen, rejected) log-probs and lengths."""
    tok, trees, _, policy_dir, reference_dir = setup
    models = {name: tiny_models.load_torch_model(d) for name, d in (("policy", policy_dir), ("ref", reference_dir))}
    rows = []
    for tree in trees:
        for turn in range(len(tree.turns)):
            if not tree.turns[turn].judged:
                continue
            row = {}
            for name, model in models.items():
                for kind in ("preferred", "rejected"):
                    row[name, kind] = _naive_reply_logps(model, tok, tree, turn, kind)
            rows.append(row)
    return rows


@pytest.fixture(scope="module")
def packed(setup):
    _, _, batch, policy_dir, reference_dir = setup
    return _packed_pair_stats(policy_dir, batch), _packed_pair_stats(reference_dir, batch)


def _torch_dpo(naive_rows, beta: float, loss_type: str, label_smoothing: float,
               length_normalise: bool | None = None) -> dict[str, float]:
    """The DPO objective of each loss type written out independently, summed over pairs; log-probs are per-token
    means for IPO and sums otherwise, unless `length_normalise` says which."""
    import torch

    # IPO compares per-token averages, so long replies do not dominate the squared margin.
    length_normalise = loss_type == "ipo" if length_normalise is None else length_normalise

    def logp(row, name, kind):
        total, length = row[name, kind]
        return torch.tensor(total / length if length_normalise else total, dtype=torch.float64)

    out = {"loss": 0.0, "pairs": 0.0, "reward_accuracy": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0,
           "reward_margin": 0.0}
    for row in naive_rows:
        pi_w, pi_l = logp(row, "policy", "preferred"), logp(row, "policy", "rejected")
        ref_w, ref_l = logp(row, "ref", "preferred"), logp(row, "ref", "rejected")
        h = (pi_w - ref_w) - (pi_l - ref_l)
        if loss_type == "sigmoid":
            loss = -(1 - label_smoothing) * torch.log(torch.sigmoid(beta * h)) \
                - label_smoothing * torch.log(torch.sigmoid(-beta * h))
        elif loss_type == "ipo":
            loss = (h - 1 / (2 * beta)) ** 2
        else:
            loss = torch.clamp(1 - beta * h, min=0)
        r_w, r_l = beta * (pi_w - ref_w), beta * (pi_l - ref_l)
        out["loss"] += float(loss)
        out["pairs"] += 1
        out["reward_accuracy"] += float(r_w > r_l)
        out["chosen_reward"] += float(r_w)
        out["rejected_reward"] += float(r_l)
        out["reward_margin"] += float(r_w - r_l)
    return out


def test_packed_pair_logps_match_pytorch_per_reply(setup, packed, naive):
    _, _, batch, _, _ = setup
    policy, ref = packed
    weight = batch["pair_weight"] > 0
    assert weight.sum() == len(naive) == MAX_PAIRS + 3  # tree 2's third pair is unjudged and left out
    for name, stats in (("policy", policy), ("ref", ref)):
        for key, kind in (("chosen", "preferred"), ("rejected", "rejected")):
            np.testing.assert_allclose(stats[key][weight], [r[name, kind][0] for r in naive], rtol=0, atol=1e-4)
            np.testing.assert_array_equal(stats[key + "_len"][weight], [r[name, kind][1] for r in naive])
    # The two models differ, so the DPO margins below are not trivially zero.
    margins = (policy["chosen"] - policy["rejected"] - ref["chosen"] + ref["rejected"])[weight]
    assert np.abs(margins).min() > 1e-2


@pytest.mark.parametrize("loss_type,beta,label_smoothing", [
    ("sigmoid", 0.9, 0.0), ("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.3, 0.0), ("hinge", 0.2, 0.0)])
def test_dpo_loss_and_metrics_match_pytorch_reference(packed, naive, setup, loss_type, beta, label_smoothing):
    _, _, batch, _, _ = setup
    policy, ref = packed
    if loss_type == "ipo":
        norm = lambda s, k: s[k] / np.maximum(s[k + "_len"], 1)  # noqa: E731
    else:
        norm = lambda s, k: s[k]  # noqa: E731
    flat = lambda x: jnp.asarray(x, jnp.float32).reshape(-1)  # noqa: E731
    loss, pairs, metrics = dpo_loss(flat(norm(policy, "chosen")), flat(norm(policy, "rejected")),
                                    flat(norm(ref, "chosen")), flat(norm(ref, "rejected")), flat(batch["pair_weight"]),
                                    beta, loss_type, label_smoothing)
    want = _torch_dpo(naive, beta, loss_type, label_smoothing)
    assert float(pairs) == want["pairs"]
    assert float(loss) == pytest.approx(want["loss"], abs=1e-4, rel=1e-5)
    for name, value in metrics.items():
        assert float(value) == pytest.approx(want[name], abs=1e-4, rel=1e-5), name


def test_sft_loss_is_mean_nll_of_preferred_judged_replies(setup, packed, naive):
    _, _, batch, _, _ = setup
    policy, _ = packed
    total, count = sft_loss(jnp.asarray(policy["logps"]), jnp.asarray(batch["sft_weight"]))
    want_total = -sum(r["policy", "preferred"][0] for r in naive)
    want_count = sum(r["policy", "preferred"][1] for r in naive)
    assert float(count) == want_count
    assert float(total) == pytest.approx(want_total, abs=1e-3, rel=1e-6)


@pytest.fixture(scope="module")
def trainer_loss_sums(setup):
    """`loss_sums(loss_type, beta, label_smoothing)`: the trainer's own DPO objective (aloe_jax.train.objectives.DPO's
    loss_sums, the function every micro-batch goes through) on the packed batch, policy and reference loaded from
    their folders."""
    import functools

    import jax

    from aloe_jax.train.config import DPOConfig
    from aloe_jax.train.objectives import DPO

    _, _, batch, policy_dir, reference_dir = setup
    graphdef, params = nnx.split(load_hf_model(str(policy_dir), read_hf_config(str(policy_dir))))
    ref_params = nnx.split(load_hf_model(str(reference_dir), read_hf_config(str(reference_dir))))[1]
    b = {k: jnp.asarray(v) for k, v in batch.items()}

    def run(loss_type: str, beta: float, label_smoothing: float):
        dpo = DPOConfig(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        fn = jax.jit(functools.partial(DPO(dpo).loss_sums, graphdef))
        return fn(params, ref_params, b)

    return run


@pytest.mark.parametrize("loss_type,beta,label_smoothing", [("sigmoid", 0.9, 0.0), ("sigmoid", 0.5, 0.2),
                                                            ("ipo", 0.3, 0.0), ("hinge", 0.2, 0.0)])
def test_trainer_dpo_objective_matches_pytorch_reference(trainer_loss_sums, naive, loss_type, beta, label_smoothing):
    """The step's loss sums and metric sums equal the torch DPO of replies scored one by one: chosen and rejected in
    the right order (a swap trains DPO backwards), and IPO on per-token means (the others on sums)."""
    loss, sums = trainer_loss_sums(loss_type, beta, label_smoothing)
    want = _torch_dpo(naive, beta, loss_type, label_smoothing)
    assert float(sums["weight"]) == want["pairs"]
    assert float(loss) == pytest.approx(want["loss"], abs=1e-4, rel=1e-5)
    for name in ("reward_accuracy", "chosen_reward", "rejected_reward", "reward_margin"):
        assert float(sums[name]) == pytest.approx(want[name], abs=1e-4, rel=1e-5), name
    # The reference tells the variants apart: IPO on sums, or any loss with chosen and rejected swapped, is far off.
    if loss_type == "ipo":
        assert abs(_torch_dpo(naive, beta, loss_type, label_smoothing, length_normalise=False)["loss"]
                   - want["loss"]) > 1e-2
    swapped = [{(model, kind): row[model, "rejected" if kind == "preferred" else "preferred"] for model, kind in row}
               for row in naive]
    assert abs(_torch_dpo(swapped, beta, loss_type, label_smoothing)["loss"] - want["loss"]) > 1e-2
