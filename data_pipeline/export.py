"""Exports of tree JSONL files (`aloe-jax export-trees`): Parquet that Hugging Face `datasets.load_dataset("parquet",
...)` reads — the tree schema (`trees`, which our trainer reads back) or TRL's conversational datasets (`trl-dpo`,
`trl-sft`) — and a TFDS ArrayRecord dataset of the tree schema that `tfds.builder_from_directory` opens and grain reads.

The TRL formats hold one row per *judged* turn t of a tree (an unjudged pair has no verdict to learn from), its
history taken along the spine as the conversation went (`TreeRecord.history(t)`: the system prompt if any, every
earlier user message and the reply that continued the chat, then turn t's user message):

- `trl-dpo`: `prompt` = that history, `chosen` = `[{"role": "assistant", "content": preferred}]`, `rejected` = the
  same with the rejected reply — TRL's conversational preference format with an explicit prompt.
- `trl-sft`: `messages` = that history + the preferred reply of turn t — TRL's conversational language-modeling
  format. SFTTrainer learns every token of it (every assistant message with `assistant_only_loss=True`), so it also
  learns the earlier replies of the history, some of them rejected replies the chat went on with; our own SFT learns
  only the preferred reply of each judged turn.

Both carry `id` (the tree's) and `turn` (t, from 0) beside TRL's columns; TRL drops columns it does not use.

Every export takes one or more tree files per split (local or gs://) and validates every record against the schema
first, so a malformed line fails the export with its file and line instead of surfacing in training.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Sequence

from aloe_jax.core import storage
from aloe_jax.conversation.records import TreeRecord, parse_tree, tree_to_row
from aloe_jax.core.errors import DataError

TFDS_NAME = "aloe_trees"
TFDS_VERSION = "1.0.0"


def read_trees(paths: Sequence[str]) -> list[TreeRecord]:
    """Every record of the given tree JSONL files, validated, in order."""
    records = []
    for path in paths:
        try:
            text = storage.decode_utf8(storage.read_bytes(path), f"tree file {path}")
        except FileNotFoundError:
            raise DataError(f"tree file {path!r} does not exist") from None
        for line_no, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                records.append(parse_tree(line, where=f"{path} line {line_no}"))
    return records


def _tree_features():
    import datasets

    string = datasets.Value("string")
    turn = {"user": string, "preferred": string, "rejected": string, "continued": string,
            "inferred_profile": string, "inferred_personality": string, "judged": datasets.Value("bool"),
            "judge": string, "candidates": string, "continued_candidate": datasets.Value("int32")}
    return datasets.Features({"id": string, "profile": string, "personality": string, "system": string,
                              "turns": datasets.List(turn), "meta": string})


def _trl_features(columns: Sequence[str]):
    import datasets

    messages = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
    return datasets.Features({"id": datasets.Value("string"), "turn": datasets.Value("int32"),
                              **{column: messages for column in columns}})


def trl_dpo_rows(record: TreeRecord) -> list[dict]:
    """TRL conversational preference rows (prompt / chosen / rejected), one per judged turn."""
    return [{"id": record.id, "turn": t, "prompt": record.history(t),
             "chosen": [{"role": "assistant", "content": turn.preferred}],
             "rejected": [{"role": "assistant", "content": turn.rejected}]}
            for t, turn in enumerate(record.turns) if turn.judged]


def trl_sft_rows(record: TreeRecord) -> list[dict]:
    """TRL conversational language-modeling rows (messages ending with the preferred reply), one per judged turn."""
    return [{"id": record.id, "turn": t, "messages": record.history(t) + [{"role": "assistant",
                                                                           "content": turn.preferred}]}
            for t, turn in enumerate(record.turns) if turn.judged]


# Parquet kind → (rows of one tree, the Arrow features of those rows).
PARQUET_KINDS = {
    "trees": (lambda record: [tree_to_row(record)], _tree_features),
    "trl-dpo": (trl_dpo_rows, lambda: _trl_features(("prompt", "chosen", "rejected"))),
    "trl-sft": (trl_sft_rows, lambda: _trl_features(("messages",))),
}


def _publish(local_dir: str, out: str) -> None:
    if storage.is_gcs(out):
        storage.upload_dir(local_dir, out)


def export_parquet(splits: dict[str, Sequence[str]], out: str, kind: str = "trees") -> dict[str, str]:
    """Write `<out>/<split>.parquet` of `kind` (a PARQUET_KINDS key) for each split of tree files; returns split →
    written path."""
    import datasets

    rows_of, features = PARQUET_KINDS[kind]
    written = {}
    with tempfile.TemporaryDirectory() as tmp:
        local = tmp if storage.is_gcs(out) else out
        os.makedirs(local, exist_ok=True)
        for split, paths in splits.items():
            rows = [row for record in read_trees(paths) for row in rows_of(record)]
            if not rows and kind != "trees":
                raise DataError(f"{split} trees {', '.join(paths)} hold no judged turn: nothing to export as {kind}")
            target = os.path.join(local, f"{split}.parquet")
            # Write beside the target and rename, so a crash never leaves a half-written Parquet file under its name.
            datasets.Dataset.from_list(rows, features=features()).to_parquet(target + ".part")
            os.replace(target + ".part", target)
            written[split] = storage.join(out, f"{split}.parquet")
        _publish(local, out)
    return written


def _builder_class():
    import tensorflow_datasets as tfds

    # Built per export and never looked up by name: keep it out of TFDS's global registry (a second export in the
    # same process would otherwise be a name collision).
    class AloeTrees(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """ALOE preference trees: one JSON TreeRecord per example, in the feature `tree`."""

        VERSION = tfds.core.Version(TFDS_VERSION)
        # Built in code, not a packaged dataset: no source folder to look for checksum or metadata files in.
        code_path = None

        def __init__(self, *, split_files: dict[str, list[str]], **kwargs):
            self._split_files = split_files
            super().__init__(**kwargs)

        def _info(self):
            # DatasetInfo directly: dataset_info_from_configs looks for metadata files beside a packaged dataset.
            return tfds.core.DatasetInfo(builder=self, description="ALOE preference trees (aloe-jax tree JSONL).",
                                         features=tfds.features.FeaturesDict({"tree": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(paths) for split, paths in self._split_files.items()}

        def _generate_examples(self, paths):
            for record in read_trees(paths):
                yield record.id, {"tree": record.model_dump_json()}

    AloeTrees.name = TFDS_NAME
    return AloeTrees


def export_tfds(splits: dict[str, Sequence[str]], out: str) -> str:
    """Write an ArrayRecord TFDS dataset whose files sit directly in `out`, so `tfds.builder_from_directory(out)`
    opens it; returns `out`."""
    import tensorflow_datasets as tfds

    ids = [r.id for paths in splits.values() for r in read_trees(paths)]
    if len(ids) != len(set(ids)):
        raise DataError("tree ids repeat across the exported files: TFDS needs unique example keys")
    with tempfile.TemporaryDirectory() as tmp:
        builder = _builder_class()(split_files={s: list(p) for s, p in splits.items()},
                                   data_dir=os.path.join(tmp, "build"), file_format="array_record")
        builder.download_and_prepare(download_dir=os.path.join(tmp, "downloads"))
        built = str(builder.data_dir)  # <data_dir>/aloe_trees/1.0.0
        if storage.is_gcs(out):
            storage.upload_dir(built, out)
        else:
            os.makedirs(out, exist_ok=True)
            for name in os.listdir(built):
                shutil.move(os.path.join(built, name), os.path.join(out, name))
    return out
