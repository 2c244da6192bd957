"""One way to read and write files that live on local disk or on Google Cloud Storage (`gs://bucket/key`).

Objects go through google-cloud-storage; checkpoints go through Orbax/tensorstore, which speak gs:// natively.
Folders that a library insists on opening from local disk (safetensors mmap, tokenizers) are mirrored into a local
cache with `localize`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import tempfile

from aloe_jax.core.errors import AloeError

GCS_PREFIX = "gs://"


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
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
    # Temporary files are created 0600; give the result the permissions a plain open() would (umask applied).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp.name, 0o666 & ~umask)
    os.replace(tmp.name, path)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a whole UTF-8 text file atomically."""
    write_bytes(path, text.encode("utf-8"))


def cache_dir() -> pathlib.Path:
    """Where remote files are mirrored locally (`ALOE_JAX_CACHE`, default ~/.cache/aloe_jax)."""
    return pathlib.Path(os.environ.get("ALOE_JAX_CACHE", pathlib.Path.home() / ".cache" / "aloe_jax"))


def localize(path: str | os.PathLike) -> str:
    """A local path holding the same file or folder as `path` (downloaded once for gs://, as-is for local)."""
    if not is_gcs(path):
        return str(path)
    digest = hashlib.sha256(str(path).rstrip("/").encode()).hexdigest()[:16]
    target = cache_dir() / "gcs" / digest
    bucket, key = _split(str(path))
    blob = _client().bucket(bucket).blob(key)
    if key and blob.exists():
        local = target / pathlib.PurePosixPath(key).name
        if not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(local) + ".part")
            os.replace(str(local) + ".part", local)
        return str(local)
    prefix = key.rstrip("/") + "/" if key else ""
    found = False
    for item in _client().list_blobs(bucket, prefix=prefix):
        found = True
        local = target / item.name[len(prefix):]
        if local.exists() and local.stat().st_size == item.size:
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        item.download_to_filename(str(local) + ".part")
        os.replace(str(local) + ".part", local)
    if not found:
        raise FileNotFoundError(str(path))
    return str(target)


def upload_dir(local_dir: str | os.PathLike, path: str) -> None:
    """Copy every file under `local_dir` to the gs:// folder `path`."""
    root = pathlib.Path(local_dir)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        _blob(join(path, file.relative_to(root).as_posix())).upload_from_filename(str(file))
