"""The training input pipeline: tree records → shuffled, tree-packed, fixed-shape batches per process (grain), and
their assembly into global arrays on the mesh.

Order of operations, all on grain's index-addressable MapDataset so that every step is reproducible from the seed and
resumable from the iterator state:

    source → shuffle(seed) → repeat(num_epochs, reshuffled each epoch) → pad to a whole number of global batches
           → parse + pack each tree → local batches of `global_rows // process_count` rows → this process's share

Global batch b is positions [b·G, (b+1)·G) of that order; process p takes rows [b·G + p·L, b·G + (p+1)·L). A tree
that cannot be packed (not even its first turn fits `seq_len`) stays in its row as a zero-weight padding row rather
than being removed, so rows never shift between processes and the union over processes is, row for row, the batch a
single process would build. The tail of the last global batch is padding rows too: no tree is silently dropped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import grain
import numpy as np
import pydantic

from aloe_jax.core.config import StrictModel
from aloe_jax.train.inputs.batch import collate
from aloe_jax.train.inputs.packing import PackedTree, pack_tree
from aloe_jax.conversation.records import parse_tree
from aloe_jax.train.inputs.sources import RawTree, open_tree_source
from aloe_jax.core.errors import ConfigError, DataError

# Per-row counters added to every batch next to collate's fields, so the trainer can log what packing cut.
STAT_FIELDS = ("turns_cut", "tree_dropped")


class DataConfig(StrictModel):
    """Where the trees are and how they become batches."""

    path: str  # .jsonl, .array_record, a folder of them, or a TFDS ArrayRecord folder; local or gs://
    split: str = "train"  # TFDS split (ignored for files)
    seq_len: int = pydantic.Field(2048, gt=0)  # tokens per packed row; longer conversations are cut at turn boundaries
    max_pairs: int = pydantic.Field(10, gt=0)  # turns (preference pairs) kept per tree; later turns are cut
    shuffle: bool = True
    seed: int = 0
    num_epochs: int = 1
    # grain reader threads; the HF tokenizer is not safe to share between threads, keep 1
    read_threads: int = pydantic.Field(1, gt=0)
    prefetch_batches: int = pydantic.Field(2, gt=0)


@dataclasses.dataclass
class _Item:
    """One position of the global order after packing: a packed tree, or a padding row (dropped or tail)."""

    tree: PackedTree | None
    turns_cut: int = 0
    dropped: bool = False


class _PadToMultiple(grain.MapDataset):
    """The parent's elements followed by None up to a multiple of `multiple` elements."""

    def __init__(self, parent: grain.MapDataset, multiple: int):
        super().__init__(parent)
        self._size = len(parent)
        self._length = math.ceil(self._size / multiple) * multiple

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[index] if index < self._size else None

    def __str__(self) -> str:
        return f"PadToMultiple(length={self._length})"


class _PackRecord:
    """RawTree → _Item: parse (errors name file and line), keep at most `max_pairs` turns, pack into `seq_len`."""

    def __init__(self, tokenizer, seq_len: int, max_pairs: int, rejected_branches: bool):
        self.tokenizer, self.seq_len, self.max_pairs = tokenizer, seq_len, max_pairs
        self.rejected_branches = rejected_branches

    def __call__(self, raw: RawTree | None) -> _Item:
        if raw is None:
            return _Item(None)
        tree = parse_tree(raw.text, where=raw.where)
        extra_turns = max(0, len(tree.turns) - self.max_pairs)
        if extra_turns:
            tree = tree.model_copy(update={"turns": tree.turns[:self.max_pairs]})
        packed = pack_tree(self.tokenizer, tree, self.seq_len, self.rejected_branches)
        if packed is None:
            return _Item(None, turns_cut=len(tree.turns) + extra_turns, dropped=True)
        return _Item(packed, turns_cut=packed.turns_cut + extra_turns)


class _Collate:
    """A list of _Item → the batch dict of `aloe_jax.train.inputs.batch.collate` plus the per-row STAT_FIELDS."""

    def __init__(self, rows: int, seq_len: int, max_pairs: int, pad_id: int):
        self.rows, self.seq_len, self.max_pairs, self.pad_id = rows, seq_len, max_pairs, pad_id

    def __call__(self, items: Sequence[_Item | None]) -> dict[str, np.ndarray]:
        items = [item or _Item(None) for item in items]
        batch = collate([item.tree for item in items], self.rows, self.seq_len, self.max_pairs, self.pad_id)
        batch["turns_cut"] = np.asarray([item.turns_cut for item in items], np.int32)
        batch["tree_dropped"] = np.asarray([item.dropped for item in items], np.int32)
        return batch


def _process_layout(global_rows: int, process_index: int | None, process_count: int | None) -> tuple[int, int, int]:
    """(process index, process count, rows per process), defaulting to this JAX process."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if global_rows <= 0 or global_rows % process_count:
        raise ConfigError(f"global batch of {global_rows} rows cannot be split evenly over {process_count} processes")
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process index {process_index} is outside 0..{process_count - 1}")
    return process_index, process_count, global_rows // process_count


def _ordered_records(cfg: DataConfig) -> grain.MapDataset:
    """Raw records in training order: shuffled per epoch (if asked), repeated `num_epochs` times."""
    if cfg.num_epochs < 1:
        raise ConfigError(f"data.num_epochs must be at least 1, got {cfg.num_epochs}")
    ds = grain.MapDataset.source(open_tree_source(cfg.path, cfg.split))
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    # repeat() reseeds the shuffle above for every epoch, so each epoch has its own order.
    return ds.repeat(cfg.num_epochs) if cfg.num_epochs > 1 else ds


def repeated_for_steps(cfg: DataConfig, global_rows: int, max_steps: int | None) -> DataConfig:
    """`cfg` with `num_epochs` raised to the fewest epochs that give `max_steps` global batches, when its own give
    fewer: like HF's and TRL's, `max_steps` overrides the epoch count instead of being cut short by it."""
    if max_steps is None:
        return cfg
    trees = len(open_tree_source(cfg.path, cfg.split))
    if not trees:
        raise DataError(f"tree data {cfg.path!r} holds no trees; max_steps={max_steps} cannot be reached")
    # Epochs follow each other without padding in between, so E epochs give ceil(E * trees / global_rows) batches.
    needed = (max_steps - 1) * global_rows // trees + 1
    return cfg.model_copy(update={"num_epochs": max(cfg.num_epochs, needed)})


def count_steps(cfg: DataConfig, global_rows: int) -> int:
    """The number of global batches `tree_batches` yields over all epochs (the last one may be partly padding)."""
    return math.ceil(len(_ordered_records(cfg)) / global_rows)


def tree_batches(cfg: DataConfig, tokenizer, global_rows: int, process_index: int | None = None,
                 process_count: int | None = None, rejected_branches: bool = True) -> grain.IterDataset:
    """This process's batches (dicts of `[global_rows // process_count, ...]` numpy arrays, see data/batch.py, plus
    STAT_FIELDS); iterate it for a checkpointable grain iterator (get_state / set_state). SFT passes
    `rejected_branches=False`: its rows then hold no rejected reply (and no preference pair)."""
    index, count, rows = _process_layout(global_rows, process_index, process_count)
    records = _ordered_records(cfg)
    steps = math.ceil(len(records) / global_rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    local_batches = (
        _PadToMultiple(records, global_rows)
        .map(_PackRecord(tokenizer, cfg.seq_len, cfg.max_pairs, rejected_branches))
        .batch(rows, batch_fn=_Collate(rows, cfg.seq_len, cfg.max_pairs, pad_id))
    )
    # Local batch j belongs to global batch j // count; this process owns those with j % count == index.
    mine = local_batches[index::count]
    print(f"tree data {cfg.path}: {len(records)} trees over {cfg.num_epochs} epoch(s) → {steps} steps of "
          f"{global_rows} rows (process {index}/{count} reads rows {index * rows}..{(index + 1) * rows - 1})",
          flush=True)
    return mine.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                  prefetch_buffer_size=cfg.prefetch_batches))


@dataclasses.dataclass
class PackingReport:
    """Running totals of what packing kept and cut, fed with batches from `tree_batches`."""

    trees: int = 0
    trees_dropped: int = 0
    trees_cut: int = 0
    turns_cut: int = 0

    def update(self, batch: dict) -> None:
        """Add one batch's counters (host numpy arrays, any rows)."""
        real = np.asarray(batch["segment"])[:, 0] >= 0
        dropped = np.asarray(batch["tree_dropped"]) > 0
        cut = np.asarray(batch["turns_cut"])
        self.trees += int(real.sum() + dropped.sum())
        self.trees_dropped += int(dropped.sum())
        self.trees_cut += int(((cut > 0) & real).sum())
        self.turns_cut += int(cut.sum())

    def summary(self) -> str:
        """One line for the log."""
        return (f"packing: {self.trees} trees read, {self.trees_cut} cut short ({self.turns_cut} turns cut in all), "
                f"{self.trees_dropped} dropped because not even their first turn fits seq_len")


def global_batch(local_batch: dict, mesh) -> dict:
    """`jax.Array`s sharded over the mesh's batch axes, assembled from every process's local batch."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from aloe_jax.models.sharding import BATCH_AXES

    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for name, value in local_batch.items()}
