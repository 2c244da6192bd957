"""The conversation engine (docs/DESIGN.md §5): a batch of conversations advancing in lockstep, turn by turn, into a
resumable run folder.

A `Script` says what one turn is — a sequence of role calls for every conversation of the batch at once — and how its
records are keyed; the engine owns the rest. Tree generation and the ALOE evaluation are two scripts on it.

Crash safety: the records of a turn are committed together, as one fsync'd append to `<folder>/turns.jsonl`. A rerun
reads the committed records (a torn last line left by a kill is dropped), keeps per conversation only the next turn in
sequence (anything else would be a duplicate) and continues each conversation from its first missing turn. Batches
are cut from the full list of conversations, never from the unfinished ones, so a batch holds the same conversations
in the same order whether or not the run was interrupted, and a resumed run writes the records an uninterrupted run
would (role calls go through the call cache, so a turn interrupted half-way replays its finished calls too).

`<folder>/<fingerprint file>` pins what makes the records comparable; a rerun with other settings in the same folder
is refused rather than mixed in. `<folder>/timings.jsonl` gets one line per committed (turn, batch): the seconds each
role took.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Iterator, Protocol, Sequence

from tqdm import tqdm

from aloe_jax.core import jsonl_log, storage
from aloe_jax.core.errors import ConfigError
from aloe_jax.llm.base import GenerationParams

RECORDS_FILE = "turns.jsonl"
# Kept across reruns, so a run that was interrupted and resumed still tells what the whole of it cost. Written just
# after the turn's records: a kill between the two writes loses that turn's line (never the records), so the total is
# then a slight undercount.
TIMINGS_FILE = "timings.jsonl"

Histories = dict[str, list[dict]]  # conversation id → its committed records, turn by turn


def derive_seed(*parts: object) -> int:
    """A 31-bit seed fixed by `parts` (stable across runs and machines, unlike Python's hash)."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def seeded(params: GenerationParams, run_seed: int, role: str, turn: int) -> GenerationParams:
    """`params` with the sampling seed of `role` at `turn` of the run seeded `run_seed`."""
    return params.model_copy(update={"seed": derive_seed(run_seed, role, turn)})


class Stopwatch:
    """Seconds per role of one turn: `with stopwatch("judge"): ...` adds the block's time to `seconds["judge"]`.
    `on_enter(role, seconds_so_far)` is told when a block starts, so a progress bar can say which role a long turn
    is in (a turn of the 100-case evaluation runs for tens of minutes on a small CPU)."""

    def __init__(self, on_enter: Callable[[str, dict[str, float]], None] | None = None):
        self.seconds: dict[str, float] = {}
        self.on_enter = on_enter

    @contextlib.contextmanager
    def __call__(self, role: str) -> Iterator[None]:
        if self.on_enter is not None:
            self.on_enter(role, self.seconds)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[role] = self.seconds.get(role, 0.0) + time.perf_counter() - start


def _in_role(where: str, role: str, done: dict[str, float]) -> str:
    """The progress bar's postfix while a turn runs `role`: "turn 5, 100 conversations: judge (done: model 420s)"."""
    finished = ", ".join(f"{r} {seconds:.0f}s" for r, seconds in done.items())
    return f"{where}: {role}" + (f" (done: {finished})" if finished else "")


class Script(Protocol):
    """One kind of conversation run on the engine (tree generation, the evaluation, ...)."""

    first_turn: int  # the number of a conversation's first turn in its records, seeds and timings (0 or 1)

    def conversation_id(self, conversation: Any) -> str:
        """The id that keys `conversation` in the records."""
        ...

    def position(self, record: dict) -> tuple[Any, Any]:
        """(conversation id, turn number) of a committed record."""
        ...

    def turn(self, conversations: list, histories: list[list[dict]], turn: int, stopwatch: Stopwatch) -> list[dict]:
        """The records of turn `turn`, one per conversation in order, given each one's committed records; role calls
        run under `stopwatch(role)`."""
        ...


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What a run folder is pinned to: `card` saved as `<folder>/<file>`; keys in `may_change` may differ on a rerun;
    `folder_setting` names the setting that chose the folder (for the refusal message)."""

    file: str
    card: dict
    folder_setting: str
    may_change: tuple[str, ...] = ()


def check_fingerprint(folder: str, fingerprint: Fingerprint) -> None:
    """Save the fingerprint in `folder`; a ConfigError when the folder already holds another run's."""
    path = os.path.join(folder, fingerprint.file)
    card = fingerprint.card
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        changed = sorted(k for k in set(saved) | set(card)
                         if k not in fingerprint.may_change and saved.get(k) != card.get(k))
        if changed:
            raise ConfigError(f"{folder!r} belongs to another run ({', '.join(changed)} differ): use a new "
                              f"{fingerprint.folder_setting}, or delete that folder to start over")
    storage.write_text(path, json.dumps(card, indent=1) + "\n")


@dataclasses.dataclass
class RunStats:
    """What one invocation did, with the seconds each role took per turn (compilation included)."""

    turns_at_start: int
    turns_done: int
    wall_s: float
    role_seconds: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)  # turn → role → s

    def table(self) -> str:
        """Per-turn seconds of each role, as plain text."""
        lines = [f"{self.turns_done} conversation turns in {self.wall_s:.1f} s ({self.turns_at_start} already "
                 "committed)"]
        for turn, seconds in sorted(self.role_seconds.items()):
            lines.append(f"turn {turn:2d}: " + "  ".join(f"{role} {s:7.1f} s" for role, s in seconds.items()))
        return "\n".join(lines)


@dataclasses.dataclass
class ConversationRun:
    """Runs (or resumes) `script` for `turns` turns per conversation in `folder`, `batch_size` conversations at a
    time (None: all of them in one batch)."""

    script: Script
    folder: str
    fingerprint: Fingerprint
    turns: int
    batch_size: int | None = None
    progress_label: str = "turns"

    @property
    def records_path(self) -> str:
        return os.path.join(self.folder, RECORDS_FILE)

    def committed(self, conversations: Sequence) -> Histories:
        """Conversation id → its committed records in turn order (duplicates and turns out of sequence ignored); cuts
        a torn last line."""
        done: Histories = {self.script.conversation_id(c): [] for c in conversations}
        for record in jsonl_log.read_complete(self.records_path):
            conversation_id, turn = self.script.position(record)
            history = done.get(conversation_id)
            if history is not None and turn == self.script.first_turn + len(history):
                history.append(record)
        return done

    def run(self, conversations: Sequence, show_progress: bool = True,
            on_batch: Callable[[Histories], None] | None = None) -> RunStats:
        """Advance every conversation to `turns` committed turns, skipping committed ones; `on_batch` gets the
        histories after each batch that ran."""
        os.makedirs(self.folder, exist_ok=True)
        check_fingerprint(self.folder, self.fingerprint)
        start = time.perf_counter()
        timings_path = os.path.join(self.folder, TIMINGS_FILE)
        done = self.committed(conversations)
        jsonl_log.read_complete(timings_path)  # cuts its torn last line too, before we append to it
        ids = [self.script.conversation_id(c) for c in conversations]
        at_start = sum(min(len(h), self.turns) for h in done.values())
        stats = RunStats(at_start, 0, 0.0)
        bar = tqdm(total=len(conversations) * self.turns, initial=at_start, desc=self.progress_label, unit="turn",
                   disable=not show_progress)
        size = self.batch_size or max(len(conversations), 1)
        for begin in range(0, len(conversations), size):
            batch = list(zip(ids[begin:begin + size], conversations[begin:begin + size]))
            if all(len(done[i]) >= self.turns for i, _ in batch):
                continue
            for index in range(self.turns):
                active = [(i, c) for i, c in batch if len(done[i]) == index]
                if not active:
                    continue
                turn = self.script.first_turn + index
                where = f"turn {turn}, {len(active)} conversations"
                bar.set_postfix_str(where)
                stopwatch = Stopwatch(on_enter=lambda role, seconds, where=where: bar.set_postfix_str(
                    _in_role(where, role, seconds)))
                records = self.script.turn([c for _, c in active], [done[i] for i, _ in active], turn, stopwatch)
                jsonl_log.append(self.records_path, records)
                jsonl_log.append(timings_path, [{"turn": turn, "cases": len(active), "seconds": stopwatch.seconds,
                                                 "finished_at": time.time()}])
                for (i, _), record in zip(active, records):
                    done[i].append(record)
                per_role = stats.role_seconds.setdefault(turn, {})
                for role, seconds in stopwatch.seconds.items():
                    per_role[role] = per_role.get(role, 0.0) + seconds
                bar.update(len(active))
            if on_batch is not None:
                on_batch(done)
        bar.close()
        stats.turns_done = sum(min(len(h), self.turns) for h in done.values()) - at_start
        stats.wall_s = time.perf_counter() - start
        return stats
