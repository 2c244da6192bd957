"""One way to read and write files that live on local disk or on Google Cloud Storage (`gs://bucket/key`).

Objects go through google-cloud-storage; checkpoints go through Orbax/tensorstore, which speak gs:// natively.
Folders that a library insists on opening from local disk (safetensors mmap, tokenizers) are mirrored into a local
cache with `localize`.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import pathlib
import tempfile

from aloe_jax.core.errors import AloeError, DataError

GCS_PREFIX = "gs://"


def disk_full(err: BaseException, path: str | os.PathLike) -> AloeError | None:
    """The one-line error for a write to `path` that failed because its disk is full (ENOSPC or a quota), else None:
    every writer of aloe-jax commits whole records or files, so what was committed before is intact."""
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(err):
        return AloeError(f"the disk is full: writing {str(path)!r} failed; nothing committed before is lost — free "
                         f"space and rerun the same command to resume")
    return None


def is_gcs(path: str | os.PathLike) -> bool:
    """True when `path` names a Cloud Storage object or prefix."""
    return str(path).startswith(GCS_PREFIX)


def join(path: str | os.PathLike, *parts: str) -> str:
    """`path/part/...` for local paths and gs:// alike."""
    if is_gcs(path):
        return "/".join([str(path).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(pathlib.Path(path, *parts))


def _split(path: str) -> tuple[str, str]:
    rest = str(path)[len(GCS_PREFIX):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise AloeError(f"{path!r} is not a valid gs:// path: expected gs://BUCKET/KEY")
    return bucket, key


@functools.lru_cache(maxsize=1)
def _client():
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        # An emulator on loopback (tests, local dev) needs no credentials; never probe the metadata server for them.
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "test"), credentials=AnonymousCredentials())
    return storage.Client()


def _blob(path: str):
    bucket, key = _split(path)
    return _client().bucket(bucket).blob(key)


def exists(path: str | os.PathLike) -> bool:
    """True when a file or a non-empty folder exists at `path`."""
    if not is_gcs(path):
        return os.path.exists(path)
    if _blob(str(path)).exists():
        return True
    return bool(list_dir(path))


def list_dir(path: str | os.PathLike) -> list[str]:
    """Names (not full paths) of the direct children of a folder; empty if there is none."""
    if not is_gcs(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    bucket, key = _split(str(path))
    prefix = key.rstrip("/") + "/" if key else ""
    names = set()
    for blob in _client().list_blobs(bucket, prefix=prefix):
        rel = blob.name[len(prefix):]
        if rel:
            names.add(rel.split("/", 1)[0])
    return sorted(names)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole content of a file."""
    if not is_gcs(path):
        with open(path, "rb") as f:
            return f.read()
    from google.api_core import exceptions

    try:
        return _blob(str(path)).download_as_bytes()
    except exceptions.NotFound:
        raise FileNotFoundError(str(path)) from None


def decode_utf8(data: bytes, where: str) -> str:
    """`data` as UTF-8 text, or a DataError naming `where` and the line of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{where} line {line} is not UTF-8 text ({err.reason} at byte {err.start}): save it as "
                        f"UTF-8") from None


def read_text(path: str | os.PathLike) -> str:
    """The whole content of a UTF-8 text file."""
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a whole file atomically (rename on local disk; GCS object writes are atomic already)."""
    if is_gcs(path):
        _blob(str(path)).upload_from_string(data)
        return
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with tmp:
            tmp.write(data)
    except OSError as err:
        os.unlink(tmp.name)  # the old file, if any, is untouched
        raise disk_full(err, path) or err from None
    # Temporary files are created 0600; give the result the permissions a plain open() would (umask applied).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp.name, 0o666 & ~umask)
    os.replace(tmp.name, path)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a whole UTF-8 text file atomically."""
    write_bytes(path, text.encode("utf-8"))


def require_writable_folder(path: str | os.PathLike, key: str = "output_dir") -> None:
    """Create the local folder `path` if needed and check a file can be written in it, so that a command refuses an
    unusable output folder in one line before it loads anything (gs:// folders are left to the first write)."""
    if is_gcs(path):
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise AloeError(f"{key} {str(path)!r} is a file, not a folder: pass a folder (new or existing)")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise AloeError(f"{key} {str(path)!r} is not a writable folder ({err.strerror}): pass a folder you can "
                        f"write to") from None


def cache_dir() -> pathlib.Path:
    """Where remote files are mirrored locally (`ALOE_JAX_CACHE`, default ~/.cache/aloe_jax)."""
    return pathlib.Path(os.environ.get("ALOE_JAX_CACHE", pathlib.Path.home() / ".cache" / "aloe_jax"))


def _cached_path(root: pathlib.Path, name: str, source: str) -> pathlib.Path:
    """`root/name`, refusing an object name that would land outside `root` (`..`, `.` or an absolute part)."""
    parts = name.split("/")
    if name.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise AloeError(f"{source!r} holds an object named {name!r}, which would be cached outside the cache "
                        f"folder: rename it without '..', '.' or empty parts")
    return root.joinpath(*parts)


def _version(blob) -> str:
    """What changes whenever the object is rewritten: its generation, with its checksum where the server has none."""
    return f"{blob.generation}:{blob.crc32c or blob.md5_hash}"


def localize(path: str | os.PathLike) -> str:
    """A local path holding the same file or folder as `path` (as-is for local; for gs://, each object is downloaded
    again whenever its generation differs from the cached copy's, so an overwritten object is never served stale)."""
    if not is_gcs(path):
        return str(path)
    digest = hashlib.sha256(str(path).rstrip("/").encode()).hexdigest()[:16]
    target = cache_dir() / "gcs" / digest
    # Which version of each object the cached copy holds; a file is listed only once its download is complete.
    manifest_path = cache_dir() / "gcs" / f"{digest}.versions.json"
    bucket, key = _split(str(path))
    blob = _client().bucket(bucket).get_blob(key) if key else None
    if blob is not None:
        name = pathlib.PurePosixPath(key).name
        items = {_cached_path(target, name, str(path)).relative_to(target).as_posix(): blob}
    else:
        prefix = key.rstrip("/") + "/" if key else ""
        # Names ending in "/" are the placeholder objects consoles create for folders: nothing to download.
        items = {item.name[len(prefix):]: item for item in _client().list_blobs(bucket, prefix=prefix)
                 if not item.name.endswith("/")}
        if not items:
            raise FileNotFoundError(str(path))
    try:
        manifest = json.loads(manifest_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        manifest = {}
    for name, item in sorted(items.items()):
        local = _cached_path(target, name, str(path))
        if local.exists() and manifest.get(name) == _version(item):
            continue
        manifest.pop(name, None)
        local.parent.mkdir(parents=True, exist_ok=True)
        item.download_to_filename(str(local) + ".part")
        os.replace(str(local) + ".part", local)
        manifest[name] = _version(item)
        write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
    return str(target / next(iter(items))) if blob is not None else str(target)


def upload_dir(local_dir: str | os.PathLike, path: str) -> None:
    """Copy every file under `local_dir` to the gs:// folder `path`."""
    root = pathlib.Path(local_dir)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        _blob(join(path, file.relative_to(root).as_posix())).upload_from_filename(str(file))
