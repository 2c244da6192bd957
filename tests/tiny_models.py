"""Tiny random HF models of every supported family, built with transformers + torch (tests and benchmarks only)."""

from __future__ import annotations

import pathlib

# Small but not degenerate: GQA (4 query heads over 2 KV heads), 2 layers, a vocab larger than any test prompt.
_COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILIES = {
    # Llama 3.1 style RoPE scaling with a small original context so the scaled band is exercised.
    "llama3": ("LlamaConfig", dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
               low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32))),
    "smollm2": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default",
                rope_theta=100000.0))),
    "mistral": ("MistralConfig", dict(sliding_window=None, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True)),
    # clip_qkv small enough that random projections really get clipped.
    "olmo": ("OlmoConfig", dict(clip_qkv=0.05)),
}


def hf_config(name: str, **overrides):
    """The transformers config object of a tiny model family, with `overrides` of its fields."""
    import transformers

    cls_name, extra = FAMILIES[name]
    return getattr(transformers, cls_name)(**{**_COMMON, **extra, **overrides})


def save_tiny_model(name: str, folder: pathlib.Path, seed: int = 0, **overrides) -> pathlib.Path:
    """Create a tiny random model of family `name` (config fields changed by `overrides`), `save_pretrained` it to
    `folder` (fp32), return the folder."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(name, **overrides), dtype=torch.float32)
    # Random (not zero/one) biases and norm weights, so a mapping mistake in any of them shows up in the logits.
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    return folder


def load_torch_model(folder: pathlib.Path):
    """transformers' PyTorch model from an HF folder, in fp32 eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
