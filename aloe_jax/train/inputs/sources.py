"""Random-access sources of raw tree records (one JSON TreeRecord each) for grain: JSONL files, ArrayRecord files,
TFDS ArrayRecord folders, and the tree schema's rows (`export-trees --format trees`) in Parquet files or Hugging Face
`datasets` folders (`save_to_disk`); local or on gs://.

Every source yields `RawTree(text, where)`: the JSON text and a human-readable location ("file.jsonl:17"), so a
malformed record deep into a shuffled epoch is reported with the file and line it came from.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import NamedTuple

import grain

from aloe_jax.conversation.records import row_json
from aloe_jax.core import storage
from aloe_jax.core.errors import DataError

ARRAY_RECORD_SUFFIX = ".array_record"
PARQUET_SUFFIX = ".parquet"
TFDS_INFO_FILE = "dataset_info.json"
TFDS_FEATURE = "tree"  # the Text feature holding one TreeRecord's JSON (data_pipeline/export.py writes it)
# What `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write beside their dataset_info.json (TFDS writes neither).
HF_DATASET_FILES = ("state.json", "dataset_dict.json")
TREE_COLUMNS = ("id", "turns")  # columns every table of the tree schema has (conversation/records.py tree_to_row)


class RawTree(NamedTuple):
    """One record's JSON text and where it was read from."""

    text: str
    where: str


class JsonlTreeSource(grain.sources.RandomAccessDataSource):
    """Trees of a JSONL file, one per non-blank line, by position; gs:// files are mirrored locally once."""

    def __init__(self, path: str):
        self._name = str(path)
        self._local = storage.localize(path)
        self._offsets: list[tuple[int, int, int]] = []  # (byte offset, byte length, 1-based line number)
        offset = 0
        with open(self._local, "rb") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    self._offsets.append((offset, len(line), number))
                offset += len(line)
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> RawTree:
        offset, length, number = self._offsets[index]
        if self._fd is None:
            self._fd = os.open(self._local, os.O_RDONLY)
        # pread is positional, so grain's reader threads can share one descriptor.
        data = os.pread(self._fd, length, offset).rstrip(b"\r\n")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{self._name}:{number}: not UTF-8 ({err.reason})") from None
        return RawTree(text, f"{self._name}:{number}")

    def __getstate__(self) -> dict:
        # A file descriptor does not survive pickling into a grain worker process; reopen there.
        return {**self.__dict__, "_fd": None}

    def __repr__(self) -> str:
        return f"JsonlTreeSource({self._name!r}, {len(self)} trees)"


class ArrayRecordTreeSource(grain.sources.RandomAccessDataSource):
    """Trees stored as UTF-8 JSON records in ArrayRecord files (in order of the files given)."""

    def __init__(self, paths: list[str]):
        self._name = paths[0] if len(paths) == 1 else f"{os.path.dirname(paths[0])} ({len(paths)} files)"
        self._records = grain.sources.ArrayRecordDataSource([storage.localize(p) for p in paths])

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> RawTree:
        where = f"{self._name} record {index}"
        return RawTree(storage.decode_utf8(bytes(self._records[index]), where), where)

    def __repr__(self) -> str:
        return f"ArrayRecordTreeSource({self._name!r}, {len(self)} trees)"


class TfdsTreeSource(grain.sources.RandomAccessDataSource):
    """Trees of a TFDS dataset folder prepared with file_format="array_record", from its Text feature `tree`."""

    def __init__(self, folder: str, split: str = "train"):
        import tensorflow_datasets as tfds

        self._name = f"{folder} [{split}]"
        builder = tfds.builder_from_directory(folder)
        if split not in builder.info.splits:
            splits = ", ".join(builder.info.splits)
            raise DataError(f"TFDS dataset {folder!r} has no split {split!r} (splits: {splits})")
        if TFDS_FEATURE not in builder.info.features:
            raise DataError(f"TFDS dataset {folder!r} has no feature {TFDS_FEATURE!r} holding the tree JSON")
        self._records = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> RawTree:
        value = self._records[index][TFDS_FEATURE]
        text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        return RawTree(text, f"{self._name} record {index}")

    def __repr__(self) -> str:
        return f"TfdsTreeSource({self._name!r}, {len(self)} trees)"


class TreeRowSource(grain.sources.RandomAccessDataSource):
    """Trees as rows of the tree schema in an Arrow table: a Parquet file read into memory, or an HF `datasets`
    folder's memory-mapped table."""

    def __init__(self, table, name: str):
        missing = [c for c in TREE_COLUMNS if c not in table.column_names]
        if missing:
            raise DataError(f"tree data {name!r} has no column {missing[0]!r}: its columns "
                            f"({', '.join(table.column_names)}) are not the tree schema that `export-trees --format "
                            f"trees` writes")
        self._table, self._name = table, name

    @classmethod
    def from_parquet(cls, path: str) -> "TreeRowSource":
        import pyarrow.parquet as pq

        return cls(pq.read_table(storage.localize(path)), path)

    @classmethod
    def from_hf_folder(cls, folder: str, split: str) -> "TreeRowSource":
        import datasets

        loaded = datasets.load_from_disk(storage.localize(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"datasets folder {folder!r} has no split {split!r} (splits: {', '.join(loaded)})")
            return cls(loaded[split].data, f"{folder} [{split}]")
        return cls(loaded.data, folder)

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, index: int) -> RawTree:
        where = f"{self._name} row {index}"
        return RawTree(row_json(self._table.slice(index, 1).to_pylist()[0], where), where)

    def __repr__(self) -> str:
        return f"TreeRowSource({self._name!r}, {len(self)} trees)"


def _tfds_version_dir(folder: str) -> str | None:
    """The folder holding dataset_info.json: `folder` itself, else its newest `version` or `name/version` child."""
    root = pathlib.Path(folder)
    if (root / TFDS_INFO_FILE).exists():
        return str(root)
    found = [p.parent for pattern in ("*/", "*/*/") for p in root.glob(pattern + TFDS_INFO_FILE)]
    version = lambda p: tuple(int(x) for x in re.findall(r"\d+", p.name))  # noqa: E731  "1.10.0" > "1.9.0"
    return str(max(found, key=version)) if found else None


def open_tree_source(path: str, split: str = "train") -> grain.sources.RandomAccessDataSource:
    """The source for a tree file or folder: `*.jsonl`, `*.array_record[-NNNNN-of-NNNNN]`, `*.parquet` of the tree
    schema, a folder of ArrayRecord files, an HF `datasets` folder (`save_to_disk`; `split` of a DatasetDict), a folder
    holding `<split>.parquet` (what `export-trees --format trees` writes), or a TFDS ArrayRecord dataset folder; local
    or gs://."""
    path = str(path).rstrip("/") if storage.is_gcs(path) else str(path)
    if not storage.exists(path):
        raise DataError(f"tree data {path!r} does not exist")
    name = path.rsplit("/", 1)[-1]
    if name.endswith(".jsonl"):
        return JsonlTreeSource(path)
    if ARRAY_RECORD_SUFFIX in name:
        return ArrayRecordTreeSource([path])
    if name.endswith(PARQUET_SUFFIX):
        return TreeRowSource.from_parquet(path)
    children = storage.list_dir(path)
    if not children:
        raise DataError(f"tree data {path!r}: unknown format (expected .jsonl, .array_record, .parquet, an HF "
                        f"datasets folder or a TFDS folder)")
    array_records = [c for c in children if ARRAY_RECORD_SUFFIX in c]
    if array_records and TFDS_INFO_FILE not in children:
        return ArrayRecordTreeSource([storage.join(path, c) for c in array_records])
    if any(f in children for f in HF_DATASET_FILES):
        return TreeRowSource.from_hf_folder(path, split)
    if f"{split}{PARQUET_SUFFIX}" in children:
        return TreeRowSource.from_parquet(storage.join(path, f"{split}{PARQUET_SUFFIX}"))
    local = storage.localize(path)
    version_dir = _tfds_version_dir(local)
    if version_dir is None:
        raise DataError(f"tree data {path!r}: a folder with no ArrayRecord files, HF datasets folder "
                        f"({' or '.join(HF_DATASET_FILES)}), {split}{PARQUET_SUFFIX} or TFDS dataset "
                        f"({TFDS_INFO_FILE}) in it")
    return TfdsTreeSource(version_dir, split)
