"""The decoder is exactly the model people think they train: logits parity with transformers' PyTorch models."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from aloe_jax.models import masks, sharding
from aloe_jax.models.config import read_hf_config
from aloe_jax.models.decoder import init_cache
from aloe_jax.models.weights import abstract_model, export_hf, hf_tensors, load_hf_model
from tests import tiny_models

FAMILIES = list(tiny_models.FAMILIES)


def _batch(seed=0, batch=3, seq=21, vocab=160, left_pad=(0, 5, 9)):
    """Token ids and a validity mask with rows left-padded by different amounts."""
    ids = np.random.RandomState(seed).randint(3, vocab, (batch, seq))
    valid = np.ones((batch, seq), bool)
    for row, pad in enumerate(left_pad[:batch]):
        valid[row, :pad] = False
        ids[row, :pad] = 0
    return ids, valid


def _torch_logits(folder, ids, valid):
    model = tiny_models.load_torch_model(folder)
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(valid.astype(np.int64))).logits.numpy()


def _our_logits(model, ids, valid):
    valid = jnp.asarray(valid)
    logits, _ = model(jnp.asarray(ids), masks.positions_from_valid(valid), masks.causal_mask(valid))
    return np.asarray(logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_with_and_without_padding(family, tiny_model_dirs):
    folder = tiny_model_dirs[family]
    model = load_hf_model(str(folder), read_hf_config(folder))
    ids, valid = _batch()
    ours, ref = _our_logits(model, ids, valid), _torch_logits(folder, ids, valid)
    assert np.abs(ours[0] - ref[0]).max() <= 1e-4  # row 0 has no padding
    for row, pad in enumerate((0, 5, 9)):
        assert np.abs(ours[row, pad:] - ref[row, pad:]).max() <= 1e-4, f"row {row} (left padding {pad})"


def test_llama31_rope_scaling_in_all_three_bands_matches_transformers(tmp_path):
    """Llama 3.1 RoPE scaling keeps short wavelengths, slows long ones by `factor` and interpolates the band between:
    with head_dim 32 and an original window of 32 positions every band holds a frequency, and positions run far past
    that window, so the inverse frequencies and the logits must equal transformers' in all three."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from aloe_jax.models.rope import inverse_frequencies

    theta, head_dim, original, low_factor, high_factor = 10000.0, 32, 32, 1.0, 4.0
    rope = dict(rope_type="llama3", rope_theta=theta, factor=8.0, low_freq_factor=low_factor,
                high_freq_factor=high_factor, original_max_position_embeddings=original)
    # Band membership from the wavelengths of the unscaled frequencies (Llama 3.1's reference definition).
    wavelength = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    high = wavelength < original / high_factor
    low = wavelength > original / low_factor
    medium = ~high & ~low
    assert high.sum() >= 1 and medium.sum() >= 1 and low.sum() >= 1, (high.sum(), medium.sum(), low.sum())

    folder = tiny_models.save_tiny_model("llama3", tmp_path / "llama31", head_dim=head_dim, rope_parameters=rope)
    cfg = read_hf_config(folder)
    assert cfg.head_dim == head_dim and cfg.rope_scaling is not None
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](tiny_models.hf_config("llama3", head_dim=head_dim,
                                                                         rope_parameters=rope))
    inv_freq = inverse_frequencies(cfg)
    np.testing.assert_allclose(inv_freq, hf_inv_freq.double().numpy(), rtol=1e-6)
    unscaled = 1 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    assert np.all(inv_freq[medium] < unscaled[medium]) and np.all(inv_freq[medium] > unscaled[medium] / 8)

    model = load_hf_model(str(folder), cfg)
    ids, valid = _batch(seq=120, left_pad=(0, 7, 30))
    assert masks.positions_from_valid(jnp.asarray(valid)).max() > 3 * original
    ours, ref = _our_logits(model, ids, valid), _torch_logits(folder, ids, valid)
    for row, pad in enumerate((0, 7, 30)):
        assert np.abs(ours[row, pad:] - ref[row, pad:]).max() <= 1e-4, f"row {row} (left padding {pad})"


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_incremental_decoding_equals_full_forward(family, tiny_model_dirs):
    folder = tiny_model_dirs[family]
    model = load_hf_model(str(folder), read_hf_config(folder))
    ids, valid = _batch(seed=1)
    full = _our_logits(model, ids, valid)
    prefill, total = 12, ids.shape[1]
    cache = init_cache(model.cfg, ids.shape[0], cache_len=32)
    kv_valid = jnp.zeros((ids.shape[0], 32), bool).at[:, :prefill].set(valid[:, :prefill])
    positions = masks.positions_from_valid(jnp.asarray(valid))
    step = nnx.jit(lambda m, t, p, mask, c, i: m(t, p, mask, c, i))
    logits, cache = step(model, jnp.asarray(ids[:, :prefill]), positions[:, :prefill],
                         masks.cached_mask(kv_valid, 0, prefill), cache, 0)
    np.testing.assert_allclose(np.asarray(logits)[0], full[0, :prefill], atol=1e-4)
    for t in range(prefill, total):
        kv_valid = kv_valid.at[:, t].set(True)
        logits, cache = step(model, jnp.asarray(ids[:, t:t + 1]), positions[:, t:t + 1],
                             masks.cached_mask(kv_valid, t, 1), cache, t)
        # Every row, padded or not, has its real tokens before slot 12, so each decoded step is comparable.
        assert np.abs(np.asarray(logits)[:, 0] - full[:, t]).max() <= 1e-4, f"step {t}"


def test_bf16_compute_stays_close_to_fp32(tiny_model_dirs):
    folder = tiny_model_dirs["llama3"]
    fp32 = load_hf_model(str(folder), read_hf_config(folder))
    bf16 = load_hf_model(str(folder), read_hf_config(folder, param_dtype="bfloat16", dtype="bfloat16"))
    assert bf16.layers[0].attn.q[...].dtype == jnp.bfloat16
    ids, valid = _batch(left_pad=(0, 0, 0))
    a, b = _our_logits(fp32, ids, valid), _our_logits(bf16, ids, valid)
    assert b.dtype == np.float32 and np.isfinite(b).all()
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max() + 0.05
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_sharded_forward_equals_single_device(family, mesh_shape, tiny_model_dirs):
    folder = tiny_model_dirs[family]
    cfg = read_hf_config(folder)
    ids, valid = _batch(batch=8, left_pad=(0, 3, 5, 7, 0, 1, 2, 4))
    ref = _our_logits(load_hf_model(str(folder), cfg), ids, valid)
    data, fsdp, tensor = mesh_shape
    mesh = sharding.make_mesh(sharding.MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    model = load_hf_model(str(folder), cfg, shardings=sharding.param_shardings(abstract_model(cfg), mesh))
    q = model.layers[0].attn.q[...]
    assert len(q.sharding.device_set) == 8
    if tensor > 1:
        assert q.sharding.spec[1] == "tensor"  # heads really are split, not silently replicated
    batch = sharding.batch_sharding(mesh)
    forward = nnx.jit(lambda m, t, v: m(t, masks.positions_from_valid(v), masks.causal_mask(v))[0])
    out = forward(model, jax.device_put(jnp.asarray(ids), batch), jax.device_put(jnp.asarray(valid), batch))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_partition_spec_replicates_dims_the_mesh_does_not_divide():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
    # 3 KV heads (SmolLM2) cannot split over tensor=2: replicate that dim, keep the fsdp split of embed.
    spec = sharding.partition_spec(("embed", "kv_heads", "head_dim"), (576, 3, 64), mesh)
    assert spec == jax.sharding.PartitionSpec("fsdp", None, None)
    spec = sharding.partition_spec(("embed", "q_heads", "head_dim"), (576, 8, 64), mesh)
    assert spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip_and_transformers_loads_export(family, tiny_model_dirs, tmp_path):
    folder = tiny_model_dirs[family]
    model = load_hf_model(str(folder), read_hf_config(folder))
    export_hf(model, tokenizer=None, out=str(tmp_path / "export"))
    again = load_hf_model(str(tmp_path / "export"), read_hf_config(tmp_path / "export"))
    before, after = hf_tensors(model), hf_tensors(again)
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    ids, valid = _batch(left_pad=(0, 2, 4))
    ref = _torch_logits(tmp_path / "export", ids, valid)
    assert np.abs(_our_logits(model, ids, valid)[0] - ref[0]).max() <= 1e-4
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["model_type"] == read_hf_config(folder).model_type


def test_export_shards_large_models_with_an_index(tiny_model_dirs, tmp_path):
    folder = tiny_model_dirs["llama3"]
    model = load_hf_model(str(folder), read_hf_config(folder))
    export_hf(model, tokenizer=None, out=str(tmp_path / "sharded"), max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = load_hf_model(str(tmp_path / "sharded"), read_hf_config(tmp_path / "sharded"))
    ids, valid = _batch()
    np.testing.assert_array_equal(_our_logits(model, ids, valid), _our_logits(again, ids, valid))
    ref = _torch_logits(tmp_path / "sharded", ids, valid)
    assert np.abs(_our_logits(again, ids, valid)[0] - ref[0]).max() <= 1e-4
