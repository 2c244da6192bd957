"""Near-duplicate filtering of generated personas, as ALOE grows its pools: a candidate is kept only if its cosine
similarity to every pool entry, and to every candidate accepted before it, is at most a threshold (0.6 in ALOE).

Embeddings are unit-norm (SentenceEncoder), so a dot product is a cosine similarity.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

import numpy as np


class Encoder(Protocol):
    """Anything that embeds texts as unit-norm rows: `SentenceEncoder` in practice."""

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """`[len(texts), dim]` unit-norm embeddings."""
        ...


class Rejected(NamedTuple):
    """A candidate the filter dropped, its highest similarity, and the text it was closest to."""

    text: str
    similarity: float
    nearest: str


class NearDuplicateFilter:
    """A persona pool with its embeddings; `filter` checks candidates against it, `add` grows it."""

    def __init__(self, encoder: Encoder, pool: Sequence[str], threshold: float = 0.6):
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity and must lie in [-1, 1], got {threshold}")
        self.encoder = encoder
        self.threshold = threshold
        self.pool: list[str] = []
        self._embeddings = np.zeros((0, 0), np.float32)  # [len(pool), dim], filled by add
        self.add(pool)

    def __len__(self) -> int:
        return len(self.pool)

    def add(self, texts: Sequence[str]) -> None:
        """Append texts to the pool unchecked (for example the candidates `filter` accepted)."""
        texts = list(texts)
        if not texts:
            return
        embeddings = self.encoder.encode(texts)
        self._embeddings = embeddings if not self.pool else np.concatenate([self._embeddings, embeddings])
        self.pool.extend(texts)

    def filter(self, candidates: Sequence[str]) -> tuple[list[str], list[Rejected]]:
        """(accepted candidates in order, rejected ones with their max similarity and nearest text).

        Each candidate is compared with the pool and with the candidates accepted before it in this call, so two
        near-identical candidates yield only the first. The pool itself is not changed: call `add(accepted)` to keep
        them (a caller may want only some).
        """
        candidates = list(candidates)
        if not candidates:
            return [], []
        embeddings = self.encoder.encode(candidates)  # [n_candidates, dim]
        to_pool = embeddings @ self._embeddings.T if self.pool else np.zeros((len(candidates), 0), np.float32)
        accepted_rows: list[int] = []
        accepted: list[str] = []
        rejected: list[Rejected] = []
        for i, text in enumerate(candidates):
            # Similarities to pool entries, then to the candidates accepted so far; the nearest is the argmax.
            sims = np.concatenate([to_pool[i], embeddings[accepted_rows] @ embeddings[i]])
            if sims.size == 0 or sims.max() <= self.threshold:
                accepted_rows.append(i)
                accepted.append(text)
            else:
                best = int(sims.argmax())
                neighbour = self.pool[best] if best < len(self.pool) else accepted[best - len(self.pool)]
                rejected.append(Rejected(text, float(sims[best]), neighbour))
        return accepted, rejected


def nearest(encoder: Encoder, queries: Sequence[str], corpus: Sequence[str]) -> list[tuple[int, float]]:
    """For each query, (index of its most similar corpus entry, that cosine similarity) — e.g. to report how close
    each eval persona is to the training pool."""
    if not corpus:
        raise ValueError("nearest needs a non-empty corpus to compare against")
    if not queries:
        return []
    sims = encoder.encode(list(queries)) @ encoder.encode(list(corpus)).T  # [n_queries, n_corpus]
    best = sims.argmax(axis=1)
    return [(int(j), float(sims[i, j])) for i, j in enumerate(best)]
