"""Exports of tree JSONL files (`aloe-jax export`): Parquet that Hugging Face `datasets.load_dataset("parquet", ...)`
reads, and a TFDS ArrayRecord dataset that `tfds.builder_from_directory` opens and grain reads.

Both take one or more tree files per split (local or gs://) and validate every record against the schema first, so a
malformed line fails the export with its file and line instead of surfacing in training.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Sequence

from aloe_jax.core import storage
from aloe_jax.conversation.records import JudgeRecord, TreeRecord, Turn, parse_tree
from aloe_jax.core.errors import DataError

TFDS_NAME = "aloe_trees"
TFDS_VERSION = "1.0.0"


def read_trees(paths: Sequence[str]) -> list[TreeRecord]:
    """Every record of the given tree JSONL files, validated, in order."""
    records = []
    for path in paths:
        try:
            text = storage.read_text(path)
        except FileNotFoundError:
            raise DataError(f"tree file {path!r} does not exist") from None
        for line_no, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                records.append(parse_tree(line, where=f"{path} line {line_no}"))
    return records


def _features():
    import datasets

    string = datasets.Value("string")
    turn = {"user": string, "preferred": string, "rejected": string, "continued": string,
            "inferred_profile": string, "inferred_personality": string, "judged": datasets.Value("bool"),
            "judge": string}  # JSON: its raw output is a string or a list, which one Arrow column cannot hold
    return datasets.Features({"id": string, "profile": string, "personality": string, "system": string,
                              "turns": datasets.List(turn), "meta": string})


def tree_to_row(record: TreeRecord) -> dict:
    """A flat, Arrow-friendly row of a tree (judge and meta as JSON strings)."""
    turns = [{**t.model_dump(exclude={"judge"}),
              "judge": None if t.judge is None else t.judge.model_dump_json()} for t in record.turns]
    return {"id": record.id, "profile": record.profile, "personality": record.personality, "system": record.system,
            "turns": turns, "meta": json.dumps(record.meta, ensure_ascii=False)}


def row_to_tree(row: dict) -> TreeRecord:
    """The tree a `tree_to_row` row holds."""
    turns = [Turn(**{**t, "judge": None if t["judge"] is None else JudgeRecord.model_validate_json(t["judge"])})
             for t in row["turns"]]
    return TreeRecord(id=row["id"], profile=row["profile"], personality=row["personality"], system=row["system"],
                      turns=turns, meta=json.loads(row["meta"]))


def _publish(local_dir: str, out: str) -> None:
    if storage.is_gcs(out):
        storage.upload_dir(local_dir, out)


def export_parquet(splits: dict[str, Sequence[str]], out: str) -> dict[str, str]:
    """Write `<out>/<split>.parquet` for each split of tree files; returns split → written path."""
    import datasets

    written = {}
    with tempfile.TemporaryDirectory() as tmp:
        local = tmp if storage.is_gcs(out) else out
        os.makedirs(local, exist_ok=True)
        for split, paths in splits.items():
            rows = [tree_to_row(r) for r in read_trees(paths)]
            target = os.path.join(local, f"{split}.parquet")
            # Write beside the target and rename, so a crash never leaves a half-written Parquet file under its name.
            datasets.Dataset.from_list(rows, features=_features()).to_parquet(target + ".part")
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
