"""Objectives as plug-ins: the registry the config names, the batch fields each reads (exactly those), what the
packer and the trainer must give each, and their FLOP counts against a count written out by hand."""

import typing

import jax
import numpy as np
import pytest
from flax import nnx

from aloe_jax.models import sharding
from aloe_jax.models.config import config_from_hf
from aloe_jax.models.decoder import Decoder
from aloe_jax.train.config import DPOConfig, GRPOConfig, ObjectiveName, TrainConfig
from aloe_jax.train.inputs.batch import collate, collate_rollouts
from aloe_jax.train.inputs.pipeline import DataConfig
from aloe_jax.train.objectives import DPO, GRPO, OBJECTIVES, SFT, objective_of
from aloe_jax.train.trainer import Trainer

FORWARD = {"tokens", "positions", "segment", "visible_prefix", "labels"}


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(output_dir="unused", data=DataConfig(path="unused.jsonl", seq_len=64, max_pairs=2),
                       batch_size=2, **kw)


def test_the_config_names_exactly_the_registered_objectives_with_their_settings():
    assert set(typing.get_args(ObjectiveName)) == set(OBJECTIVES) == {"sft", "dpo", "grpo"}
    assert objective_of(_cfg()) == SFT()
    dpo = DPOConfig(beta=0.3, loss_type="hinge", reference="other-model")
    objective = objective_of(_cfg(objective="dpo", dpo=dpo))
    assert isinstance(objective, DPO) and objective.config == dpo and objective.reference_model == "other-model"
    assert SFT().reference_model is None
    grpo = GRPOConfig(variant="dr_grpo", kl_coef=0.0, reference="ref-model")
    objective = objective_of(_cfg(objective="grpo", grpo=grpo))
    assert isinstance(objective, GRPO) and objective.config == grpo
    assert not objective.needs_reference and not objective.holds_reference and objective.forward_passes == 3
    kl = objective_of(_cfg(objective="grpo"))
    assert kl.needs_reference and kl.holds_reference and kl.forward_passes == 4 and kl.reference_model is None


def _tiny(tie: bool = True):
    return config_from_hf(dict(model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               tie_word_embeddings=tie))


@pytest.mark.parametrize("objective,fields,rejected,reference", [
    (SFT(), FORWARD | {"sft_weight"}, False, False),
    (DPO(), FORWARD | {"reply_index", "pair_chosen", "pair_rejected", "pair_weight"}, True, True),
    (GRPO(), FORWARD | {"reply_index", "reply_advantage", "reply_weight", "old_logprobs"}, True, True),
])
def test_each_objective_reads_exactly_its_batch_fields(objective, fields, rejected, reference):
    """SFT needs the forward pass and its target weights, DPO the reply indices and pairs instead (and rejected
    branches packed, and a reference): the loss runs on those fields alone, and fails without any one of them."""
    assert set(objective.batch_fields) == fields
    assert (objective.rejected_branches, objective.needs_reference) == (rejected, reference)
    graphdef, params = nnx.split(Decoder(_tiny(), nnx.Rngs(0)))
    full = {**collate([], 2, 64, 2), **collate_rollouts([], [], 2, 64, 4),
            "old_logprobs": np.zeros((2, 64), np.float32)}
    ref_params = params if reference else None
    loss = lambda batch: objective.loss_sums(graphdef, params, ref_params, batch)  # noqa: E731
    jax.eval_shape(loss, {name: full[name] for name in fields})
    for missing in fields:
        with pytest.raises(KeyError):
            jax.eval_shape(loss, {name: full[name] for name in fields - {missing}})


@pytest.mark.parametrize("objective", ["sft", "dpo", "grpo"])
def test_the_trainer_places_only_the_objectives_fields_on_the_mesh(objective):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2), devices=jax.devices()[:2])
    trainer = Trainer(_cfg(objective=objective), sharding.shard_model(Decoder(_tiny(), nnx.Rngs(0)), mesh), mesh, 1)
    local = {**collate([], 2, 64, 2), **collate_rollouts([], [], 2, 64, 4), "old_logprobs": np.zeros((2, 64), np.float32),
             "turns_cut": np.zeros(2, np.int32), "tree_dropped": np.zeros(2, np.int32)}
    assert set(trainer.device_batch(local)) == set(OBJECTIVES[objective].batch_fields)
    assert (trainer.ref_params is not None) == trainer.objective.needs_reference


@pytest.mark.parametrize("tie", [True, False])
def test_flops_per_token_against_a_hand_count(tie):
    """The tiny Llama by hand: per layer q 32·32, k and v 32·16 each, o 32·32, MLP 3·32·64, two RMSNorm scales of
    32 (counted as the model's parameters count them); a final norm; the 256×32 output head (tied: the embedding,
    counted once; untied: the input embedding is a lookup and does not count). Attention over 192 positions:
    QK^T and PV, 2 FLOPs per multiply-add, 4 heads of 8 dims, 2 layers."""
    layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32
    matmul_weights = 2 * layer + 32 + 256 * 32
    forward = 2 * matmul_weights + 2 * 2 * 2 * 4 * 8 * 192
    assert forward == 102720
    cfg = _tiny(tie)
    assert SFT().flops_per_token(cfg, 192) == 3 * forward  # forward + backward (twice the forward)
    assert DPO().flops_per_token(cfg, 192) == 4 * forward  # and the reference's forward
