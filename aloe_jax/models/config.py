"""`ModelConfig`: the architecture of a Llama-like decoder, read from an HF `config.json` or a named preset.

One config drives every supported family through flags (qkv bias, tied embeddings, norm kind, clip_qkv, RoPE
scaling) so there is a single decoder implementation.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

from aloe_jax.core import storage
from aloe_jax.core.errors import ConfigError, ModelLoadError

# HF `model_type` → the HF architecture class name we export as. SmolLM2 is a Llama.
SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "olmo": "OlmoForCausalLM",
}

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 / 3.1 frequency-dependent RoPE scaling (HF `rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture plus the dtypes to store (`param_dtype`) and compute (`dtype`) in."""

    model_type: Literal["llama", "mistral", "qwen2", "olmo"]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    # "rms": weighted RMSNorm (Llama, Mistral, Qwen2). "layernorm": LayerNorm without weight or bias (OLMo-7B-0724).
    norm_type: Literal["rms", "layernorm"] = "rms"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    clip_qkv: float | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(unsupported_model_type_message(self.model_type))
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"model {name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def architecture(self) -> str:
        return SUPPORTED_MODEL_TYPES[self.model_type]

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (for example dtypes)."""
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Number of parameters, counting a tied embedding once."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        attn += hd * (self.num_heads + 2 * self.num_kv_heads) * self.qkv_bias + d * self.o_bias
        mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
        norms = 2 * d * (self.norm_type == "rms")
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * (attn + mlp + norms) + d * (self.norm_type == "rms") + head

    def to_hf_dict(self) -> dict:
        """The HF `config.json` content for this architecture, readable by transformers 4.4x and 5: the installed
        transformers' format plus RoPE in both spellings."""
        from transformers import CONFIG_MAPPING

        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, **dataclasses.asdict(self.rope_scaling)}
        kwargs: dict[str, Any] = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_parameters=rope,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else
            (self.eos_token_ids[0] if self.eos_token_ids else None),
            hidden_act="silu",
        )
        if self.model_type in ("llama", "mistral"):
            kwargs.update(head_dim=self.head_dim, rms_norm_eps=self.norm_eps)
        if self.model_type == "llama":
            kwargs.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.model_type == "mistral":
            kwargs.update(sliding_window=None)
        if self.model_type == "qwen2":
            kwargs.update(rms_norm_eps=self.norm_eps, use_sliding_window=False)
        if self.model_type == "olmo":
            kwargs.update(clip_qkv=self.clip_qkv, attention_bias=self.qkv_bias)
        hf = CONFIG_MAPPING[self.model_type](**kwargs).to_dict()
        # transformers 5 reads `rope_parameters`; 4.x reads only top-level `rope_theta` and `rope_scaling` (without
        # the theta; null for plain RoPE), and 5 reads those too, ahead of rope_parameters, so they must agree.
        hf["rope_theta"] = self.rope_theta
        hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"} if self.rope_scaling else None
        hf["architectures"] = [self.architecture]
        hf["torch_dtype"] = hf["dtype"] = self.param_dtype
        return hf


def unsupported_model_type_message(model_type: object) -> str:
    return (
        f"unsupported model_type {model_type!r}: aloe-jax supports "
        + ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        + " (SmolLM2 is a llama)"
    )


def _require(hf: dict, key: str, source: str):
    if key not in hf or hf[key] is None:
        raise ConfigError(f"{source}: required field {key!r} is missing")
    return hf[key]


def _rope_from_hf(hf: dict, source: str) -> tuple[float, RopeScaling | None]:
    # transformers ≥ 5 writes `rope_parameters`; older configs (and the Hub's Llama 3.1 files) use rope_theta +
    # rope_scaling. Accept both so checkpoints from either era load.
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or scaling.get("rope_type") or scaling.get("type")
    rope_type = rope_type or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ConfigError(f"{source}: RoPE type {rope_type!r} is not supported (supported: default, llama3)")
    fields = {**scaling, **params}
    try:
        return float(theta), RopeScaling(
            factor=float(fields["factor"]),
            low_freq_factor=float(fields["low_freq_factor"]),
            high_freq_factor=float(fields["high_freq_factor"]),
            original_max_position_embeddings=int(fields["original_max_position_embeddings"]),
        )
    except KeyError as missing:
        raise ConfigError(f"{source}: llama3 RoPE scaling is missing field {missing}") from None


def config_from_hf(hf: dict, source: str = "config.json", **dtypes: str) -> ModelConfig:
    """A ModelConfig from the dict of an HF `config.json`; rejects what the decoder does not implement."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{source}: " + unsupported_model_type_message(model_type))
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only silu)")
    max_pos = int(hf.get("max_position_embeddings", 4096))
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", model_type == "mistral")
    if uses_window and window is not None and int(window) < max_pos:
        raise ConfigError(
            f"{source}: sliding-window attention (sliding_window={window}) is not supported; set sliding_window to "
            "null (Mistral-7B-Instruct-v0.3 uses full attention)"
        )
    num_heads = int(_require(hf, "num_attention_heads", source))
    hidden = int(_require(hf, "hidden_size", source))
    theta, scaling = _rope_from_hf(hf, source)
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
    elif model_type in ("llama", "olmo"):
        qkv_bias = o_bias = bool(hf.get("attention_bias", False))
    else:
        qkv_bias = o_bias = False
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(_require(hf, "vocab_size", source)),
        hidden_size=hidden,
        intermediate_size=int(_require(hf, "intermediate_size", source)),
        num_layers=int(_require(hf, "num_hidden_layers", source)),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or hidden // num_heads),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        norm_type="layernorm" if model_type == "olmo" else "rms",
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        clip_qkv=float(hf["clip_qkv"]) if hf.get("clip_qkv") is not None else None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=max_pos,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(int(e) for e in eos_ids),
        **dtypes,
    )


def read_hf_config(folder: str | os.PathLike, **dtypes: str) -> ModelConfig:
    """The ModelConfig of an HF model folder (local or gs://)."""
    folder = str(folder)
    if not storage.exists(folder):
        raise ModelLoadError(f"model path {folder!r} does not exist")
    path = storage.join(folder, "config.json")
    try:
        text = storage.read_text(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ModelLoadError(f"{folder!r} has no config.json: expected an HF model folder") from None
    try:
        hf = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path!r} is not valid JSON: {err}") from None
    return config_from_hf(hf, source=path, **dtypes)
