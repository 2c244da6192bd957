"""Train/eval contamination report (`aloe-jax contamination`): for every eval persona, the most similar train persona
and their cosine similarity (MiniLM embeddings), so one can see whether the benchmark's users were, in effect, in
the training data."""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

from aloe_jax.core import storage
from data_pipeline.dedup import Encoder, nearest


@dataclasses.dataclass
class NearestTrain:
    """One eval persona and its nearest train persona."""

    kind: str  # "profile" | "personality"
    eval_index: int
    eval_text: str
    train_index: int
    train_text: str
    similarity: float


def contamination(encoder: Encoder, kind: str, eval_pool: Sequence[str],
                  train_pool: Sequence[str]) -> list[NearestTrain]:
    """For each eval persona of `kind`, its nearest train persona and their cosine similarity."""
    return [NearestTrain(kind, i, eval_pool[i], j, train_pool[j], sim)
            for i, (j, sim) in enumerate(nearest(encoder, eval_pool, train_pool))]


def summary_table(rows: Sequence[NearestTrain], threshold: float) -> str:
    """Per kind: count, min / mean / max nearest-train similarity and how many exceed `threshold`."""
    lines = [f"{'kind':<12} {'n':>3} {'min':>6} {'mean':>6} {'max':>6} {f'>{threshold:g}':>7}"]
    for kind in sorted({r.kind for r in rows}):
        sims = [r.similarity for r in rows if r.kind == kind]
        over = sum(s > threshold for s in sims)
        lines.append(f"{kind:<12} {len(sims):>3} {min(sims):6.3f} {sum(sims) / len(sims):6.3f} {max(sims):6.3f} "
                     f"{over:>7}")
    return "\n".join(lines)


def write_report(rows: Sequence[NearestTrain], path: str) -> None:
    """The report as JSONL (one eval persona per line), written atomically (local or gs://)."""
    storage.write_text(path, "".join(json.dumps(dataclasses.asdict(r), ensure_ascii=False) + "\n" for r in rows))
