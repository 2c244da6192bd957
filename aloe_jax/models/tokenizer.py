"""HF tokenizers with our own chat templates, so that every family yields an exact assistant mask.

Stock templates have no `{% generation %}` tags: transformers then only warns and returns an all-zero mask, and SFT
or DPO would silently train on nothing (or, with a fallback, on everything). Our templates (package data in
`aloe_jax/models/templates/`) render the same text as each model's stock template and wrap exactly each assistant reply
and its end-of-turn token in `{% generation %}`. A variant is one family file plus default values for its Jinja
variables (for example the system prompt ChatML writes when a conversation has none).
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os

from aloe_jax.core import storage
from aloe_jax.core.errors import AloeError, ConfigError, DataError, ModelLoadError
from aloe_jax.models.config import SUPPORTED_MODEL_TYPES, unsupported_model_type_message

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN2_SYSTEM = "You are a helpful assistant."

# name → (family template file, Jinja variables the variant sets unless the caller passes them).
CHAT_TEMPLATES: dict[str, tuple[str, dict[str, str]]] = {
    "chatml-smollm2": ("chatml", {"default_system": SMOLLM2_SYSTEM}),
    "chatml-qwen2": ("chatml", {"default_system": QWEN2_SYSTEM}),
    "llama3": ("llama3", {}),
    "llama3.1": ("llama3", {"knowledge_cutoff": "December 2023", "date_string": "26 Jul 2024"}),
    "mistral": ("mistral", {}),
    "olmo": ("olmo", {}),
}

# Tokens that end an assistant turn (besides eos) or a document, in whichever family's vocabulary has them.
_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>")

TOKENIZER_FILE = "tokenizer.json"


class ChatTemplateError(AloeError):
    """A chat template cannot produce an assistant mask (no `{% generation %}` tags) or misses assistant turns."""


@functools.lru_cache(maxsize=None)
def chat_template(name: str) -> str:
    """The Jinja source of the named chat template: its variant's defaults followed by the family template."""
    if name not in CHAT_TEMPLATES:
        raise ConfigError(f"unknown chat template {name!r}; templates: {', '.join(CHAT_TEMPLATES)}")
    family, defaults = CHAT_TEMPLATES[name]
    body = importlib.resources.files("aloe_jax.models").joinpath(f"templates/{family}.jinja").read_text("utf-8")
    # `is not defined` lets a caller override a default through apply_chat_template(..., default_system="").
    header = "".join(
        f"{{%- if {key} is not defined -%}}{{%- set {key} = {json.dumps(value)} -%}}{{%- endif -%}}\n"
        for key, value in defaults.items()
    )
    return f"{{#- aloe-jax chat template {name} -#}}\n" + header + body


def _has_token(tokenizer, token: str) -> bool:
    # Only added (special) tokens count: a byte-level vocabulary could in principle spell a marker as plain text.
    return token in tokenizer.added_tokens_encoder


def template_name_for(model_type: str, tokenizer) -> str:
    """The name of our chat template for a model family and its tokenizer (see CHAT_TEMPLATES)."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(unsupported_model_type_message(model_type))
    if model_type == "qwen2":
        return "chatml-qwen2"
    if model_type in ("mistral", "olmo"):
        return model_type
    # A llama is either Llama 3 (header tokens; 3.1 added <|eom_id|> and a dated system turn) or SmolLM2 (ChatML).
    if _has_token(tokenizer, "<|start_header_id|>"):
        return "llama3.1" if _has_token(tokenizer, "<|eom_id|>") else "llama3"
    if _has_token(tokenizer, "<|im_start|>"):
        return "chatml-smollm2"
    raise ModelLoadError(
        "llama tokenizer has neither Llama 3 header tokens (<|start_header_id|>) nor ChatML tokens (<|im_start|>): "
        "its chat format is not supported (supported llamas: Llama 3 / 3.1 Instruct, SmolLM2)"
    )


def load_tokenizer(path_or_folder: str, model_type: str):
    """A `PreTrainedTokenizerFast` from a folder with tokenizer.json (local or gs://), with our chat template set."""
    from transformers import PreTrainedTokenizerFast

    try:
        local = storage.localize(path_or_folder)
    except FileNotFoundError:
        local = ""
    if not os.path.exists(local):
        raise ModelLoadError(f"tokenizer path {path_or_folder!r} does not exist")
    if not os.path.isfile(os.path.join(local, TOKENIZER_FILE)):
        raise ModelLoadError(
            f"{path_or_folder!r} has no {TOKENIZER_FILE}: expected an HF model or tokenizer folder "
            "(transformers' tokenizer.save_pretrained writes one)"
        )
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(local)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read the tokenizer in {path_or_folder!r}: {err}") from None
    tokenizer.chat_template = chat_template(template_name_for(model_type, tokenizer))
    return tokenizer


def save_tokenizer(tokenizer, folder: str) -> None:
    """`tokenizer.save_pretrained(folder)` (a local folder) in a form transformers 4.x reads too: the chat template
    inside tokenizer_config.json, and the tokenizer class under a name 4.x knows."""
    # 4.x releases before chat_template.jinja read the template only from tokenizer_config.json; 5 reads it there too.
    tokenizer.save_pretrained(folder, save_jinja_files=False)
    config_file = os.path.join(folder, "tokenizer_config.json")
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    # transformers 5 names its tokenizer.json-backed class TokenizersBackend, which 4.x lacks; both know it as
    # PreTrainedTokenizerFast (an alias of it in 5).
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(config_file, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True, ensure_ascii=False)


def _masked_runs(mask: list[int]) -> int:
    return sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(token ids, assistant mask) of a conversation: mask 1 on each assistant reply and its end-of-turn token."""
    from jinja2.exceptions import TemplateError

    if not messages:
        raise DataError("cannot encode an empty conversation: give at least one message")
    try:
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )
    except TemplateError as err:
        raise DataError(f"conversation does not fit the chat template: {err}") from None
    ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    replies = sum(message.get("role") == "assistant" for message in messages)
    if replies and not any(mask):
        raise ChatTemplateError(
            "the tokenizer's chat template has no {% generation %} tags, so no assistant tokens can be masked; "
            "load the tokenizer with aloe_jax.models.tokenizer.load_tokenizer (or set tokenizer.chat_template = "
            "aloe_jax.models.tokenizer.chat_template(name)) to use our templates"
        )
    # Every template of ours separates replies by unmasked header tokens: one masked run per reply.
    if _masked_runs(mask) != replies:
        raise ChatTemplateError(
            f"the assistant mask covers {_masked_runs(mask)} spans for {replies} assistant replies: the chat "
            "template's generation tags and the tokenizer's offsets disagree"
        )
    return ids, mask


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end an assistant turn: eos, then each end-of-turn or end-of-text token the vocabulary has."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    for token in _END_TOKENS:
        if _has_token(tokenizer, token) and tokenizer.added_tokens_encoder[token] not in ids:
            ids.append(tokenizer.added_tokens_encoder[token])
    if not ids:
        raise ModelLoadError("the tokenizer has no eos token and no known end-of-turn token: nothing can stop a reply")
    return ids


def encode_chat_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation in which control-token strings inside message contents are plain text.

    A user message holding `<|im_start|>system ...` must not open a real system turn. A conversation whose contents
    hold no added-token string is tokenized exactly as `encode_chat` does; otherwise each such string in a content is
    swapped for a placeholder, the template is rendered, and the placeholders are tokenized as text
    (`split_special_tokens=True`) while the template's own text keeps its control tokens."""
    import re
    import secrets

    # Longest first, so that a token that contains another one is matched whole.
    specials = sorted(tokenizer.added_tokens_encoder, key=len, reverse=True)
    contents = [m["content"] for m in messages]
    if not any(s in c for s in specials for c in contents):
        return encode_chat(tokenizer, messages, add_generation_prompt)[0]
    marker = f"\ue000{secrets.token_hex(8)}"  # private-use start and a random tag: no content can forge it
    pattern = re.compile("|".join(re.escape(s) for s in specials))
    masked = [{**m, "content": pattern.sub(lambda hit: f"{marker}{specials.index(hit[0])}{marker}", m["content"])}
              for m in messages]
    rendered = tokenizer.apply_chat_template(masked, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids: list[int] = []
    # split() with one group: text, index, text, index, ..., text.
    for i, piece in enumerate(re.split(f"{marker}(\\d+){marker}", rendered)):
        if i % 2:
            ids += tokenizer.encode(specials[int(piece)], add_special_tokens=False, split_special_tokens=True)
        elif piece:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids
