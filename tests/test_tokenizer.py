"""Our chat templates: exact assistant masks for every family, the same text as the stock templates, loud failures."""

import json

import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from aloe_jax.core.errors import ConfigError, DataError, ModelLoadError
from aloe_jax.models.gguf import read_gguf, read_gguf_metadata, smollm2_gguf_path
from aloe_jax.models.tokenizer import (
    QWEN2_SYSTEM,
    SMOLLM2_SYSTEM,
    ChatTemplateError,
    chat_template,
    encode_chat,
    load_tokenizer,
    stop_token_ids,
    template_name_for,
)

SYSTEM = {"role": "system", "content": "Be brief."}
# Three replies, with the leading/trailing whitespace that some templates trim and others keep.
TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "  What is 2+2?  "},
    {"role": "assistant", "content": " It is 4.\n"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]

# template name → (model_type, special tokens in id order, special-token roles, how a reply appears in the text).
FAMILIES = {
    "chatml-smollm2": ("llama", None, {}, lambda reply: reply + "<|im_end|>"),
    "chatml-qwen2": ("qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                     dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), lambda reply: reply + "<|im_end|>"),
    "llama3": ("llama", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>"],
               dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"),
               lambda reply: reply.strip() + "<|eot_id|>"),
    "llama3.1": ("llama", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>", "<|eom_id|>"],
                 dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
                 lambda reply: reply.strip() + "<|eot_id|>"),
    "mistral": ("mistral", ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"), lambda reply: " " + reply.strip() + "</s>"),
    # OLMo's role headers are plain text in its vocabulary, so they are not special here either.
    "olmo": ("olmo", ["<|endoftext|>", "<|padding|>"], dict(eos_token="<|endoftext|>", pad_token="<|padding|>"),
             lambda reply: reply + "<|endoftext|>"),
}


def _with_specials(base: PreTrainedTokenizerFast, specials: list[str], **roles) -> PreTrainedTokenizerFast:
    """SmolLM2's real byte-level BPE with its control tokens renamed to `specials` (same ids, the rest reserved), so
    each family's tokenizer has its own markers and none of another family's."""
    state = json.loads(base.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    for i, added in enumerate(state["added_tokens"]):
        new = specials[i] if i < len(specials) else f"<|reserved_{i}|>"
        del vocab[added["content"]]
        vocab[new] = added["id"]
        added["content"] = new
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)),
                                   clean_up_tokenization_spaces=False, **roles)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return read_gguf(smollm2_gguf_path())[2]


@pytest.fixture(scope="module")
def stock_smollm2_template():
    return read_gguf_metadata(smollm2_gguf_path())["tokenizer.chat_template"]


@pytest.fixture(scope="module")
def tokenizers(smollm2_tokenizer):
    """template name → a tokenizer of that family carrying our template for it."""
    out = {}
    for name, (model_type, specials, roles, _) in FAMILIES.items():
        tokenizer = smollm2_tokenizer if specials is None else _with_specials(smollm2_tokenizer, specials, **roles)
        tokenizer.chat_template = chat_template(template_name_for(model_type, tokenizer))
        out[name] = tokenizer
    return out


def _masked_spans(ids: list[int], mask: list[int]) -> list[list[int]]:
    spans, current = [], []
    for token, masked in zip(ids, mask):
        if masked:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("history", ["full", "prompt"])
def test_assistant_mask_covers_exactly_each_reply_and_its_end_token(tokenizers, name, history):
    tokenizer, reply_text = tokenizers[name], FAMILIES[name][3]
    messages = [SYSTEM, *TURNS] if history == "full" else [SYSTEM, *TURNS[:-1]]
    ids, mask = encode_chat(tokenizer, messages, add_generation_prompt=history == "prompt")
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(ids) == len(mask) and len(replies) >= 2
    assert [_decode(tokenizer, span) for span in _masked_spans(ids, mask)] == [reply_text(r) for r in replies]
    # Nothing else is masked and nothing is lost: the unmasked rest is exactly the text around the replies.
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=history == "prompt")
    assert _decode(tokenizer, ids) == text
    unmasked = _decode(tokenizer, [t for t, m in zip(ids, mask) if not m])
    for reply in replies:
        text = text.replace(reply_text(reply), "", 1)
    assert unmasked == text
    if history == "prompt":
        assert mask[-1] == 0  # the generation prompt (or Mistral's [/INST]) is context, not target


CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [SYSTEM, *TURNS],
    TURNS,
    TURNS[:-1],
    [SYSTEM, *TURNS[:3]],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chatml_renders_like_the_stock_smollm2_and_qwen2_templates(tokenizers, stock_smollm2_template, messages,
                                                                   add_generation_prompt):
    # Qwen2-7B-Instruct's stock template is SmolLM2's with "You are a helpful assistant." as the default system prompt.
    assert SMOLLM2_SYSTEM in stock_smollm2_template and QWEN2_SYSTEM == "You are a helpful assistant."
    stock = {"chatml-smollm2": stock_smollm2_template,
             "chatml-qwen2": stock_smollm2_template.replace(SMOLLM2_SYSTEM, QWEN2_SYSTEM)}
    for name, template in stock.items():
        tokenizer = tokenizers[name]
        ours = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        theirs = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
        assert ours == theirs
        assert encode_chat(tokenizer, messages, add_generation_prompt)[0] == tokenizer(theirs).input_ids


HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"
DATED = HEADER.format("system") + "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
# The official formats written out by hand: (template, messages, add_generation_prompt, expected text).
GOLDEN = [
    ("llama3", [SYSTEM, *TURNS], False,
     "<|begin_of_text|>" + HEADER.format("system") + "Be brief.<|eot_id|>"
     + HEADER.format("user") + "Hi there<|eot_id|>" + HEADER.format("assistant") + "Hello! How can I help?<|eot_id|>"
     + HEADER.format("user") + "What is 2+2?<|eot_id|>" + HEADER.format("assistant") + "It is 4.<|eot_id|>"
     + HEADER.format("user") + "And 3+3?<|eot_id|>" + HEADER.format("assistant") + "6<|eot_id|>"),
    ("llama3", TURNS[:1], True,
     "<|begin_of_text|>" + HEADER.format("user") + "Hi there<|eot_id|>" + HEADER.format("assistant")),
    ("llama3.1", [SYSTEM, *TURNS[:1]], True,
     "<|begin_of_text|>" + DATED + "Be brief.<|eot_id|>" + HEADER.format("user") + "Hi there<|eot_id|>"
     + HEADER.format("assistant")),
    ("llama3.1", TURNS[:2], False,
     "<|begin_of_text|>" + DATED + "<|eot_id|>" + HEADER.format("user") + "Hi there<|eot_id|>"
     + HEADER.format("assistant") + "Hello! How can I help?<|eot_id|>"),
    # Mistral v0.3 puts the system message into the last user turn, and only when the conversation ends with it.
    ("mistral", [SYSTEM, *TURNS[:5]], False,
     "<s>[INST] Hi there[/INST] Hello! How can I help?</s>[INST]   What is 2+2?  [/INST] It is 4.</s>"
     "[INST] Be brief.\n\nAnd 3+3?[/INST]"),
    ("mistral", [SYSTEM, *TURNS], True,
     "<s>[INST] Hi there[/INST] Hello! How can I help?</s>[INST]   What is 2+2?  [/INST] It is 4.</s>"
     "[INST] And 3+3?[/INST] 6</s>"),
    ("olmo", [SYSTEM, *TURNS], False,
     "<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\nHello! How can I help?<|endoftext|>\n"
     "<|user|>\n  What is 2+2?  \n<|assistant|>\n It is 4.\n<|endoftext|>\n<|user|>\nAnd 3+3?\n<|assistant|>\n"
     "6<|endoftext|>"),
    ("olmo", TURNS[:3], True,
     "<|user|>\nHi there\n<|assistant|>\nHello! How can I help?<|endoftext|>\n<|user|>\n  What is 2+2?  \n"
     "<|assistant|>\n"),
]


@pytest.mark.parametrize("name, messages, add_generation_prompt, expected", GOLDEN)
def test_renders_the_official_format(tokenizers, name, messages, add_generation_prompt, expected):
    text = tokenizers[name].apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == expected


def test_default_system_prompt_can_be_overridden(tokenizers):
    text = tokenizers["chatml-smollm2"].apply_chat_template(TURNS[:1], tokenize=False, default_system="")
    assert text == "<|im_start|>user\nHi there<|im_end|>\n"


def test_template_without_generation_tags_fails_loudly(tokenizers, stock_smollm2_template):
    tokenizer = tokenizers["chatml-qwen2"]
    stock = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>",
                                    chat_template=stock_smollm2_template)
    with pytest.raises(ChatTemplateError, match="generation"):
        encode_chat(stock, TURNS)
    ids, mask = encode_chat(stock, TURNS[:1], add_generation_prompt=True)  # no reply: an empty mask is right
    assert ids and not any(mask)
    stock.chat_template = ("{% for m in messages %}{% if loop.index0 == 1 %}{% generation %}{{ m.content }}"
                           "{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="covers 1 spans for 3 assistant replies"):
        encode_chat(stock, TURNS)
    # Too many spans is as wrong as too few: each reply masked twice, around an unmasked special token.
    stock.chat_template = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                           "{% endgeneration %}<|im_start|>{% generation %}{{ m.content }}{% endgeneration %}"
                           "{% else %}{{ m.content }}{% endif %}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="covers 6 spans for 3 assistant replies"):
        encode_chat(stock, TURNS)


def test_bad_conversations_raise_data_errors(tokenizers):
    with pytest.raises(DataError, match="empty"):
        encode_chat(tokenizers["llama3"], [])
    with pytest.raises(DataError, match="alternate"):
        encode_chat(tokenizers["mistral"], [TURNS[0], TURNS[0]])
    with pytest.raises(DataError, match="got tool"):
        encode_chat(tokenizers["mistral"], [TURNS[0], {"role": "tool", "content": "42"}])


@pytest.mark.parametrize("name, expected", [
    ("chatml-smollm2", ["<|im_end|>", "<|endoftext|>"]),
    ("chatml-qwen2", ["<|im_end|>", "<|endoftext|>"]),
    ("llama3", ["<|end_of_text|>", "<|eot_id|>"]),
    ("llama3.1", ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"]),
    ("mistral", ["</s>"]),
    ("olmo", ["<|endoftext|>"]),
])
def test_stop_token_ids(tokenizers, name, expected):
    tokenizer = tokenizers[name]
    assert stop_token_ids(tokenizer) == tokenizer.convert_tokens_to_ids(expected)


def test_chatml_tokenizer_whose_eos_is_end_of_text_still_stops_at_the_end_of_a_turn(smollm2_tokenizer):
    # Base-model ChatML tokenizers (Qwen2 base) have eos <|endoftext|>; a reply still ends with <|im_end|>.
    base = _with_specials(smollm2_tokenizer, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                          eos_token="<|endoftext|>")
    assert stop_token_ids(base) == base.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])


def test_template_name_for(tokenizers):
    for name, (model_type, *_) in FAMILIES.items():
        assert template_name_for(model_type, tokenizers[name]) == name
    plain = _with_specials(tokenizers["chatml-smollm2"], ["<s>", "</s>"], eos_token="</s>")
    with pytest.raises(ModelLoadError, match="chat format"):
        template_name_for("llama", plain)
    with pytest.raises(ConfigError, match="gpt2"):
        template_name_for("gpt2", plain)
    with pytest.raises(ConfigError, match="unknown chat template"):
        chat_template("vicuna")


def test_load_tokenizer_replaces_the_stock_template(smollm2_tokenizer, tokenizers, stock_smollm2_template, tmp_path):
    _, specials, roles, _ = FAMILIES["llama3"]
    saved = _with_specials(smollm2_tokenizer, specials, **roles)
    saved.chat_template = stock_smollm2_template  # any template without generation tags, as shipped on the Hub
    saved.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path), "llama")
    assert loaded.chat_template == chat_template("llama3")
    assert encode_chat(loaded, [SYSTEM, *TURNS]) == encode_chat(tokenizers["llama3"], [SYSTEM, *TURNS])
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"), "llama")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"), "llama")
