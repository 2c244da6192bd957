"""Growing a persona pool by self-generation (`aloe-jax personas`): each round shows the generator a few pool entries
as examples, asks for new ones, and keeps a candidate only when it is not a near-duplicate of the pool or of a
candidate accepted before it. Accepted entries are appended to the output as they are found, so a rerun resumes
where the last one stopped.

The output is a JSONL of strings — the format of the released ALOE pools — holding the seeds, then what was grown.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from typing import Sequence

from tqdm import tqdm

from aloe_jax.core import storage
from aloe_jax.core.errors import DataError
from aloe_jax.llm.roles import Role
from aloe_jax.core import jsonl_log
from data_pipeline import prompts
from aloe_jax.conversation.aloe_pools import load_pool, parse_json_lines
from data_pipeline.config import DatagenConfig
from data_pipeline.dedup import Encoder, NearDuplicateFilter


@dataclasses.dataclass
class GrowthReport:
    """What a `grow_pool` run did."""

    start_size: int
    final_size: int
    rounds: int
    candidates: int
    accepted: int
    stop_reason: str  # "target" | "no new entries" | "max rounds"


def read_pool_file(path: str) -> list[str]:
    """The strings of a JSONL persona file (local or gs://)."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise DataError(f"persona file {path!r} does not exist") from None
    return parse_json_lines(data, where=path)


def output_path(cfg: DatagenConfig) -> str:
    """The pool file this config grows (`{kind}` in the path is replaced by the pool kind)."""
    return cfg.personas.output.replace("{kind}", cfg.personas.kind)


def _working_copy(output: str) -> str:
    # Appends need a local file: a gs:// pool is grown in a local mirror and uploaded after every round.
    if not storage.is_gcs(output):
        return output
    digest = hashlib.sha256(output.encode()).hexdigest()[:16]
    return str(storage.cache_dir() / "personas" / f"{digest}.jsonl")


def _round_rng(seed: int, pool_size: int) -> random.Random:
    # Keyed by pool size, not by a round counter: a resumed run poses the same prompts as an uninterrupted one
    # without keeping any state besides the pool itself.
    return random.Random(f"personas:{seed}:{pool_size}")


def grow_pool(cfg: DatagenConfig, generator: Role, encoder: Encoder, seeds: Sequence[str] | None = None,
              show_progress: bool = True) -> GrowthReport:
    """Grow the pool of `cfg.personas` until it has `target_size` entries, a round accepts nothing, or `max_rounds`
    rounds ran; returns what happened. The output file holds the pool after every accepted entry."""
    pc = cfg.personas
    output = output_path(cfg)
    local = _working_copy(output)
    pool = [r for r in jsonl_log.read_complete(local) if isinstance(r, str)]
    if not pool and storage.is_gcs(output) and storage.exists(output):
        pool = read_pool_file(output)
        jsonl_log.append(local, pool)
    if not pool:
        if seeds is None:
            seeds = read_pool_file(pc.seeds) if pc.seeds else load_pool(pc.kind, "train", cfg.aloe_data)
        if not seeds:
            raise DataError("the seed pool is empty: give at least one example persona")
        pool = list(seeds)
        jsonl_log.append(local, pool)
    start_size = len(pool)
    threshold = pc.threshold[pc.kind]
    dedup = NearDuplicateFilter(encoder, pool, threshold)
    params = cfg.roles.persona_generator.generation
    report = GrowthReport(start_size, start_size, 0, 0, 0, "target")
    bar = tqdm(total=pc.target_size, initial=min(len(pool), pc.target_size), desc=f"{pc.kind} pool",
               disable=not show_progress, unit="entry")
    while len(dedup) < pc.target_size:
        if report.rounds >= pc.max_rounds:
            report.stop_reason = "max rounds"
            break
        rng = _round_rng(cfg.seed, len(dedup))
        k = min(pc.examples_per_prompt, len(dedup))
        chats = [prompts.persona_generator_messages(pc.kind, rng.sample(dedup.pool, k), pc.candidates_per_prompt)
                 for _ in range(pc.prompts_per_round)]
        replies = generator.chat(chats, params.model_copy(update={"seed": rng.randrange(2**31)}))
        candidates = [c for r in replies for c in prompts.parse_persona_list(r.text, pc.min_words)]
        accepted, _ = dedup.filter(candidates)
        accepted = accepted[: pc.target_size - len(dedup)]
        report.rounds += 1
        report.candidates += len(candidates)
        report.accepted += len(accepted)
        if not accepted:
            report.stop_reason = "no new entries"
            break
        jsonl_log.append(local, accepted)
        dedup.add(accepted)
        bar.update(len(accepted))
        if local != output:
            storage.write_text(output, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in dedup.pool))
    bar.close()
    report.final_size = len(dedup)
    if local != output and not storage.exists(output):
        storage.write_text(output, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in dedup.pool))
    return report


def describe(report: GrowthReport, output: str) -> str:
    """One line summarising a growth run."""
    rate = f"{report.accepted / report.candidates:.0%}" if report.candidates else "-"
    return (f"{output}: {report.start_size} → {report.final_size} entries in {report.rounds} round(s); "
            f"{report.accepted}/{report.candidates} candidates kept ({rate}); stopped: {report.stop_reason}")

