"""HF safetensors ↔ NNX decoder parameters, without torch.

One table (`_hf_layout`) says, for every parameter, its HF tensor name and how the HF layout (PyTorch Linear
`[out, in]`, flattened heads) maps to ours (`[in, heads, head_dim]` einsum layout). Loading reads it one way,
export the other, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable, Iterator

import jax
import numpy as np
from flax import nnx

from aloe_jax.core import storage
from aloe_jax.core.errors import ModelLoadError
from aloe_jax.models import lora
from aloe_jax.models.config import ModelConfig
from aloe_jax.models.decoder import Decoder, RuntimeOptions
from aloe_jax.models.tokenizer import save_tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"

# kind → (HF array → ours, ours → HF array); `shape` is our parameter's shape.
_Converters = tuple[Callable[[np.ndarray, tuple], np.ndarray], Callable[[np.ndarray], np.ndarray]]
_KINDS: dict[str, _Converters] = {
    "same": (lambda w, shape: w.reshape(shape), lambda p: p),
    # Linear into heads: HF [heads*head_dim, embed] ↔ ours [embed, heads, head_dim]; also plain [out, in] ↔ [in, out].
    "linear_in": (lambda w, shape: w.T.reshape(shape), lambda p: p.reshape(p.shape[0], -1).T),
    # Linear out of heads: HF [embed, heads*head_dim] ↔ ours [heads, head_dim, embed].
    "linear_out": (lambda w, shape: w.T.reshape(shape), lambda p: p.reshape(-1, p.shape[-1]).T),
    # Per-head bias: HF [heads*head_dim] ↔ ours [heads, head_dim].
    "bias": (lambda w, shape: w.reshape(shape), lambda p: p.reshape(-1)),
}


def _hf_layout(cfg: ModelConfig) -> Iterator[tuple[tuple, str, str]]:
    """(our state path, HF tensor name, kind) for every parameter of a decoder with this config."""
    yield ("embed",), "model.embed_tokens.weight", "same"
    for i in range(cfg.num_layers):
        hf = f"model.layers.{i}"
        for name in ("q", "k", "v"):
            yield ("layers", i, "attn", name), f"{hf}.self_attn.{name}_proj.weight", "linear_in"
            if cfg.qkv_bias:
                yield ("layers", i, "attn", f"{name}_bias"), f"{hf}.self_attn.{name}_proj.bias", "bias"
        yield ("layers", i, "attn", "o"), f"{hf}.self_attn.o_proj.weight", "linear_out"
        if cfg.o_bias:
            yield ("layers", i, "attn", "o_bias"), f"{hf}.self_attn.o_proj.bias", "same"
        for name in ("gate", "up", "down"):
            yield ("layers", i, "mlp", name), f"{hf}.mlp.{name}_proj.weight", "linear_in"
            if cfg.mlp_bias:
                yield ("layers", i, "mlp", f"{name}_bias"), f"{hf}.mlp.{name}_proj.bias", "same"
        if cfg.norm_type == "rms":
            yield ("layers", i, "attn_norm", "scale"), f"{hf}.input_layernorm.weight", "same"
            yield ("layers", i, "mlp_norm", "scale"), f"{hf}.post_attention_layernorm.weight", "same"
    if cfg.norm_type == "rms":
        yield ("final_norm", "scale"), "model.norm.weight", "same"
    if not cfg.tie_word_embeddings:
        yield ("lm_head",), "lm_head.weight", "linear_in"


class TensorSource:
    """Named tensors of an HF folder, read lazily from one or several safetensors files."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        self.folder = folder
        index_path = os.path.join(folder, INDEX_FILE)
        if os.path.exists(index_path):
            try:
                weight_map = json.load(open(index_path))["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ModelLoadError(f"{index_path!r} is not a valid safetensors index ({err})") from None
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(folder, SINGLE_FILE)):
            files, weight_map = [SINGLE_FILE], None
        else:
            raise ModelLoadError(f"{folder!r} has no {SINGLE_FILE} or {INDEX_FILE}: no weights to load")
        self._handles = {}
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                raise ModelLoadError(f"weights file {path!r} named in the index is missing")
            try:
                self._handles[name] = safe_open(path, framework="numpy")
            except Exception as err:  # safetensors raises its own error type for truncated or corrupt headers
                raise ModelLoadError(f"cannot read weights file {path!r}: {err} (truncated or corrupt?)") from None
        self._where = weight_map or {key: SINGLE_FILE for key in self._handles[SINGLE_FILE].keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        file = self._where.get(name)
        if file is None:
            raise ModelLoadError(f"tensor {name!r} is missing from the weights in {self.folder!r}")
        try:
            return self._handles[file].get_tensor(name)
        except Exception as err:
            raise ModelLoadError(f"cannot read tensor {name!r} from {file!r}: {err} (truncated or corrupt?)") from None


def abstract_model(cfg: ModelConfig, options: RuntimeOptions = RuntimeOptions()) -> Decoder:
    """A decoder whose parameters are shapes only (no memory), ready to be filled."""
    return nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0), options))


def model_from_tensors(
    cfg: ModelConfig,
    get_tensor: Callable[[str], np.ndarray],
    shardings: Callable[[tuple], jax.sharding.Sharding | None] | None = None,
    options: RuntimeOptions = RuntimeOptions(),
) -> Decoder:
    """A decoder filled from HF-named tensors; `shardings(path)` places each parameter (default: one device)."""
    model = abstract_model(cfg, options)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    filled = set()
    for path, hf_name, kind in _hf_layout(cfg):
        variable = flat[path]
        shape, dtype = variable.shape, variable.dtype
        array = _KINDS[kind][0](np.asarray(get_tensor(hf_name)), shape)
        if array.shape != tuple(shape):
            raise ModelLoadError(f"tensor {hf_name!r} has shape {array.shape}, config expects {tuple(shape)}")
        array = array.astype(dtype)
        sharding = shardings(path) if shardings else None
        if sharding is None:
            value = jax.device_put(array)
        else:
            value = jax.make_array_from_callback(array.shape, sharding, lambda idx, a=array: a[idx])
        variable.set_value(value) if hasattr(variable, "set_value") else setattr(variable, "value", value)
        filled.add(path)
    missing = set(flat) - filled
    if missing:
        raise ModelLoadError(f"no HF tensor maps to parameters {sorted(missing)[:3]}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_hf_model(
    folder: str,
    cfg: ModelConfig,
    shardings: Callable[[tuple], jax.sharding.Sharding | None] | None = None,
    options: RuntimeOptions = RuntimeOptions(),
) -> Decoder:
    """A decoder with the weights of an HF folder (local or gs://, single or sharded safetensors)."""
    source = TensorSource(storage.localize(folder))
    return model_from_tensors(cfg, source.get, shardings, options)


def _host_array(value: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(jax.device_get(value))


def hf_tensors(model: Decoder) -> dict[str, np.ndarray]:
    """The model's parameters as HF-named numpy arrays in HF layout (gathered to this host)."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    return {hf_name: np.ascontiguousarray(_KINDS[kind][1](_host_array(flat[path][...])))
            for path, hf_name, kind in _hf_layout(model.cfg)}


def save_safetensors(tensors: dict[str, np.ndarray], folder: str, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write tensors as `model.safetensors`, or as shards plus an index when larger than `max_shard_bytes`."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors files without a known format tag
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, SINGLE_FILE), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata=metadata)
        weight_map.update({key: name for key in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)


def _hf_module(target: str) -> str:
    """The HF module path of one of our projections inside a layer (`self_attn.q_proj`, `mlp.down_proj`)."""
    return f"{'self_attn' if lora.PROJECTIONS[target][0] == 'attn' else 'mlp'}.{target}_proj"


def peft_tensors(model: Decoder) -> dict[str, np.ndarray]:
    """The LoRA adapters of an (unrolled) decoder under PEFT's names for a transformers causal LM: lora_A `[rank,
    in]`, lora_B `[out, rank]` in PyTorch Linear layout."""
    flat = dict(nnx.to_flat_state(nnx.filter_state(nnx.state(model), lora.LoraParam)))
    tensors = {}
    for i in range(model.cfg.num_layers):
        for target, (parent, _) in lora.PROJECTIONS.items():
            a = flat.get(("layers", i, parent, f"{target}_lora_a"))
            if a is None:
                continue
            b = flat[("layers", i, parent, f"{target}_lora_b")]
            a, b = _host_array(a[...]), _host_array(b[...])
            prefix = f"base_model.model.model.layers.{i}.{_hf_module(target)}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)  # [rank, in]
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.reshape(b.shape[0], -1).T)  # [out, rank]
    return tensors


def export_peft(model: Decoder, out: str, base_model: str) -> None:
    """Write a decoder's LoRA adapters as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
    that `peft.PeftModel.from_pretrained(<base_model loaded in transformers>, out)` loads. `out` may be gs://."""
    from safetensors.numpy import save_file

    cfg = lora.config_of(model)
    if cfg is None:
        raise ModelLoadError("the model has no LoRA adapters to export: export it without --adapter")
    tensors = peft_tensors(model)
    if jax.process_index() != 0:
        return
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "bias": "none",
        "target_modules": [f"{t}_proj" for t in cfg.targets], "fan_in_fan_out": False, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
    }
    with tempfile.TemporaryDirectory() as tmp:
        local = out if not storage.is_gcs(out) else tmp
        os.makedirs(local, exist_ok=True)
        save_file(tensors, os.path.join(local, ADAPTER_FILE), metadata={"format": "pt"})
        with open(os.path.join(local, ADAPTER_CONFIG_FILE), "w") as f:
            json.dump(adapter_config, f, indent=2)
        if storage.is_gcs(out):
            storage.upload_dir(local, out)


def export_hf(model: Decoder, tokenizer, out: str, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write an HF folder (config, generation config, safetensors, tokenizer + chat template) that
    `transformers.AutoModelForCausalLM.from_pretrained` loads. `out` may be gs://."""
    tensors = hf_tensors(model)
    if jax.process_index() != 0:
        return
    cfg = model.cfg
    with tempfile.TemporaryDirectory() as tmp:
        local = out if not storage.is_gcs(out) else tmp
        os.makedirs(local, exist_ok=True)
        save_safetensors(tensors, local, max_shard_bytes)
        with open(os.path.join(local, "config.json"), "w") as f:
            json.dump(cfg.to_hf_dict(), f, indent=2)
        generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids), "do_sample": False}
        with open(os.path.join(local, "generation_config.json"), "w") as f:
            json.dump(generation, f, indent=2)
        if tokenizer is not None:
            save_tokenizer(tokenizer, local)
        if storage.is_gcs(out):
            storage.upload_dir(local, out)
