"""The original ALOE persona pools, read from a local or gs:// folder or fetched from the public repository at a
pinned revision; every file is checked against its sha256 before use.

The files are JSON-lines of strings, but not strictly: in `profile.jsonl` one line holds two JSON strings back to
back (330 lines, 331 profiles), and `profile_eval.jsonl` has no final newline. The parser therefore reads every JSON
value on a line instead of one value per line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import urllib.error
import urllib.request
from typing import Literal

from aloe_jax.core import storage
from aloe_jax.core.errors import DataError

ALOE_REPO = "ShujinWu-0814/ALOE"
ALOE_REVISION = "b1b8285e3a759c8f7d9b84034447c89857f02e98"
PINNED_BASE_URL = f"https://raw.githubusercontent.com/{ALOE_REPO}/{ALOE_REVISION}"

PoolKind = Literal["profile", "personality"]
PoolSplit = Literal["train", "eval"]


@dataclasses.dataclass(frozen=True)
class AloeFile:
    """One released pool file: where it lives in the repository and the sha256 of its bytes."""

    repo_path: str
    sha256: str

    @property
    def filename(self) -> str:
        """The file's name, which is also its name inside a local or gs:// source folder."""
        return self.repo_path.rsplit("/", 1)[-1]


ALOE_FILES: dict[str, AloeFile] = {
    "profile": AloeFile("datasets/profile.jsonl",
                        "da50fe0d650f8ec39c21fd425fdb3f6a63f6cf0153ddf0cfede597b83f533918"),
    "personality": AloeFile("datasets/personality.jsonl",
                            "6b62c41a029a60c27a51113869cb69060e061078d9c20ab580de88ca70e38b07"),
    "profile_eval": AloeFile("datasets/profile_eval.jsonl",
                             "3d58a1d36fb2b6a39069ebd5f65b7ac34894f3fbe36a05ac0eb5779c4fde9652"),
    "personality_eval": AloeFile("datasets/personality_eval.jsonl",
                                 "01251b2537c838cf417fad652c692ede14182875b834f821bbc7e8b74dd53cc6"),
}

_RETRY_DELAYS_S = (1.0, 3.0)  # waits before the 2nd and 3rd download attempts
_DOWNLOAD_TIMEOUT_S = 60.0


def pool_file(kind: str, split: str) -> str:
    """The ALOE_FILES name of a pool: `profile`, `personality`, `profile_eval` or `personality_eval`."""
    if kind not in ("profile", "personality"):
        raise DataError(f"unknown persona pool kind {kind!r}: use 'profile' or 'personality'")
    if split not in ("train", "eval"):
        raise DataError(f"unknown persona pool split {split!r}: use 'train' or 'eval'")
    return kind if split == "train" else f"{kind}_eval"


def load_pool(kind: PoolKind, split: PoolSplit, source: str | None = None) -> list[str]:
    """The persona descriptions of one released pool, in file order.

    `source` is a local folder or gs:// folder holding the files under their own names (`profile.jsonl`, ...), an
    http(s):// base URL laid out like the repository (`<base>/datasets/profile.jsonl`), or None for the public
    repository at the pinned revision (downloaded once into the aloe_jax cache).
    """
    name = pool_file(kind, split)
    return parse_json_lines(read_verified(name, source), where=_describe(name, source))


def read_verified(name: str, source: str | None = None) -> bytes:
    """The bytes of ALOE file `name` from `source` (see `load_pool`), after checking their sha256."""
    if name not in ALOE_FILES:
        raise DataError(f"unknown ALOE file {name!r}: expected one of {sorted(ALOE_FILES)}")
    if source is None or _is_url(source):
        return _fetch_cached(name, source or PINNED_BASE_URL)
    return verify(name, _read_folder_file(name, source), where=_describe(name, source))


def verify(name: str, data: bytes, where: str) -> bytes:
    """`data` unchanged when its sha256 is the pinned one for ALOE file `name`; a DataError otherwise."""
    expected = ALOE_FILES[name].sha256
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise DataError(f"checksum mismatch for ALOE file {name!r} read from {where}: expected sha256 {expected}, "
                        f"got {actual}. The copy is altered or from another revision; use the files of "
                        f"{ALOE_REPO} at revision {ALOE_REVISION}.")
    return data


def parse_json_lines(data: bytes, where: str) -> list[str]:
    """Every JSON string in `data`, in order, reading all values on a line (some lines hold several)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where} is not UTF-8 text (byte {err.start}): re-download the file") from None
    values: list[str] = []
    # Split on "\n" only: str.splitlines would also split on U+2028 and friends, which JSON strings may hold raw.
    for line_no, line in enumerate(text.split("\n"), start=1):
        values.extend(_parse_line(line, line_no, where))
    return values


def _parse_line(line: str, line_no: int, where: str) -> list[str]:
    decoder = json.JSONDecoder()
    values = []
    pos = _skip_space(line, 0)
    while pos < len(line):
        try:
            value, pos = decoder.raw_decode(line, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{where} line {line_no}: invalid JSON at column {err.colno}: {err.msg}") from None
        if not isinstance(value, str):
            raise DataError(f"{where} line {line_no}: expected a JSON string, found {type(value).__name__}")
        values.append(value)
        pos = _skip_space(line, pos)
    return values


def _skip_space(line: str, pos: int) -> int:
    while pos < len(line) and line[pos].isspace():
        pos += 1
    return pos


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _describe(name: str, source: str | None) -> str:
    if source is None or _is_url(source):
        return _url(source or PINNED_BASE_URL, name)
    return storage.join(source, ALOE_FILES[name].filename)


def _url(base_url: str, name: str) -> str:
    return f"{base_url.rstrip('/')}/{ALOE_FILES[name].repo_path}"


def _read_folder_file(name: str, folder: str) -> bytes:
    if not storage.exists(folder):
        raise DataError(f"ALOE data folder {folder!r} does not exist: pass a folder holding "
                        f"{', '.join(f.filename for f in ALOE_FILES.values())}, or no source to fetch them from "
                        f"{ALOE_REPO}")
    path = storage.join(folder, ALOE_FILES[name].filename)
    try:
        return storage.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError):
        raise DataError(f"ALOE file {path!r} is missing: copy {ALOE_FILES[name].repo_path} of {ALOE_REPO} "
                        f"(revision {ALOE_REVISION}) there, or pass no source to fetch it") from None


def _fetch_cached(name: str, base_url: str) -> bytes:
    # Content-addressed: the cache key is the pinned hash, so any mirror serving the right bytes fills the same entry,
    # and a stale or corrupt entry is detected (and replaced) by the same check.
    file = ALOE_FILES[name]
    cached = storage.cache_dir() / "aloe_pools" / file.sha256 / file.filename
    if cached.exists():
        data = cached.read_bytes()
        if hashlib.sha256(data).hexdigest() == file.sha256:
            return data
    url = _url(base_url, name)
    data = verify(name, _download(url), where=url)
    storage.write_bytes(cached, data)
    return data


class _TransientError(Exception):
    """A download failure that a retry may cure (network trouble, HTTP 5xx)."""


def _download(url: str) -> bytes:
    for delay_s in _RETRY_DELAYS_S:
        try:
            return _get(url)
        except _TransientError:
            time.sleep(delay_s)
    try:
        return _get(url)
    except _TransientError as err:
        raise DataError(f"downloading {url} failed ({err}): check the network, or pass a local folder holding the "
                        f"ALOE files as the source") from None


def _get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        if err.code >= 500:
            raise _TransientError(f"HTTP {err.code}") from None
        # A 4xx will not heal on retry: the URL or revision is wrong.
        raise DataError(f"downloading {url} failed with HTTP {err.code}: check the URL, or pass a local folder "
                        f"holding the ALOE files as the source") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        raise _TransientError(str(getattr(err, "reason", err))) from None
