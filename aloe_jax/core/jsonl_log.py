"""Append-only JSONL files that survive a crash: each append is one `write` of whole lines, fsync'd, so a kill leaves
at most a torn *last* line, which `read_complete` detects and cuts off before anything appends again."""

from __future__ import annotations

import json
import os

from aloe_jax.core import storage
from aloe_jax.core.errors import DataError


def read_complete(path: str, repair: bool = True) -> list:
    """Every complete JSON record of a local JSONL file (none if it does not exist). A torn last line — left by a
    process killed mid-write — is removed from the file so the next append starts on a clean line; a bad line
    anywhere else means the file is not such a log, and is a DataError (nothing is cut).

    repair=False only reads: for readers beside a live writer (a report of a run in progress), whose torn last line
    may be an append still under way — cutting it would corrupt the writer's line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    *lines, tail = data.split(b"\n")
    records = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise DataError(f"{path} line {line_no} is not one JSON value: this file was not written by aloe-jax "
                            f"(pass it as input instead of as the output to append to)") from None
    if tail.strip() and not repair:
        try:
            records.append(json.loads(tail))
        except json.JSONDecodeError:
            pass  # torn (or still being written): not a record yet
    elif tail.strip():
        try:
            # Our records are strings or objects, whose JSON cannot be cut short and still parse: a parseable tail is
            # whole and only lacks its newline.
            records.append(json.loads(tail))
            with open(path, "ab") as f:
                f.write(b"\n")
                os.fsync(f.fileno())
        except json.JSONDecodeError:
            with open(path, "r+b") as f:
                f.truncate(len(data) - len(tail))
                os.fsync(f.fileno())
    return records


def append(path: str, records: list) -> None:
    """Append records as JSON lines and fsync: when this returns they are on disk; a kill inside it tears at most the
    last line, which `read_complete` drops."""
    if not records:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    try:
        with open(path, "ab") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        # A write cut short by a full disk leaves a torn last line, which the next read_complete cuts off.
        raise storage.disk_full(err, path) or err from None
