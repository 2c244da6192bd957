"""The original ALOE pools load from a local folder, gs:// or a pinned download, always checked by sha256.

The download path runs for real against an http.server on loopback serving a copy laid out like the repository.
"""

import functools
import hashlib
import http.server
import json
import pathlib
import shutil
import threading

import pytest

from aloe_jax.core import storage
from aloe_jax.core.errors import DataError
from aloe_jax.conversation import aloe_pools
from aloe_jax.conversation.aloe_pools import ALOE_FILES, load_pool, parse_json_lines

ALOE_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "aloe_data"
SIZES = {("profile", "train"): 331, ("personality", "train"): 71, ("profile", "eval"): 20, ("personality", "eval"): 7}


def _copy_data(dest: pathlib.Path) -> pathlib.Path:
    dest.mkdir(parents=True)
    for file in ALOE_FILES.values():
        shutil.copy(ALOE_DATA / file.filename, dest / file.filename)
    return dest


def _flip_byte(path: pathlib.Path, offset: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind, split", sorted(SIZES))
def test_local_pools_have_the_released_sizes(kind, split):
    pool = load_pool(kind, split, str(ALOE_DATA))
    assert len(pool) == SIZES[kind, split]
    assert all(isinstance(p, str) and len(p.split()) > 10 for p in pool)
    assert len(set(pool)) == len(pool)


def test_line_with_two_json_strings_gives_two_profiles():
    lines = (ALOE_DATA / "profile.jsonl").read_text().split("\n")
    assert len([line for line in lines if line]) == 330
    decoder = json.JSONDecoder()
    first, end = decoder.raw_decode(lines[5])
    second = json.loads(lines[5][end:])
    pool = load_pool("profile", "train", str(ALOE_DATA))
    assert pool[5:7] == [first, second]
    assert pool[7] == json.loads(lines[6])


def test_json_lines_parser_reads_every_value_and_names_bad_lines():
    assert parse_json_lines(b'"a" "b"\n\n  "c"\r\n"d\\u2028e"', where="x") == ["a", "b", "c", "d\u2028e"]
    with pytest.raises(DataError, match=r"pool\.jsonl line 2: invalid JSON"):
        parse_json_lines(b'"ok"\n"unterminated\n', where="pool.jsonl")
    with pytest.raises(DataError, match=r"line 1: expected a JSON string, found dict"):
        parse_json_lines(b'{"a": 1}', where="pool.jsonl")


def test_altered_copy_fails_its_checksum(tmp_path):
    folder = _copy_data(tmp_path / "aloe")
    _flip_byte(folder / "profile.jsonl")
    actual = hashlib.sha256((folder / "profile.jsonl").read_bytes()).hexdigest()
    with pytest.raises(DataError) as err:
        load_pool("profile", "train", str(folder))
    message = str(err.value)
    assert "profile.jsonl" in message and ALOE_FILES["profile"].sha256 in message and actual in message
    assert len(load_pool("personality", "train", str(folder))) == 71  # the other files are untouched


def test_missing_folder_or_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_pool("profile", "train", str(tmp_path / "nowhere"))
    folder = _copy_data(tmp_path / "aloe")
    (folder / "personality_eval.jsonl").unlink()
    with pytest.raises(DataError, match=r"personality_eval\.jsonl.* is missing"):
        load_pool("personality", "eval", str(folder))
    with pytest.raises(DataError, match="unknown persona pool kind 'persona'"):
        load_pool("persona", "train", str(folder))


class _Server:
    """A loopback http.server serving a folder; counts the GET requests it answered."""

    def __init__(self, root: pathlib.Path):
        self.requests = 0
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def repo_mirror(tmp_path, monkeypatch):
    """A copy of the ALOE files laid out like the repository (`datasets/...`), served on loopback; the cache points
    into tmp_path. Yields (server, served folder)."""
    monkeypatch.setenv("ALOE_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # never route loopback through a proxy a CI machine may set
    folder = _copy_data(tmp_path / "mirror" / "datasets")
    server = _Server(folder.parent)
    yield server, folder
    server.close()


def test_pinned_fetch_downloads_once_verifies_and_caches(repo_mirror, monkeypatch):
    server, _ = repo_mirror
    # source=None means the pinned repository URL; point it at the loopback mirror.
    monkeypatch.setattr(aloe_pools, "PINNED_BASE_URL", server.url)
    assert len(load_pool("profile", "train")) == 331
    assert len(load_pool("personality", "eval")) == 7
    assert server.requests == 2
    cached = storage.cache_dir() / "aloe_pools" / ALOE_FILES["profile"].sha256 / "profile.jsonl"
    assert cached.read_bytes() == (ALOE_DATA / "profile.jsonl").read_bytes()
    server.close()
    assert len(load_pool("profile", "train")) == 331  # served from the cache, the server is gone
    assert server.requests == 2


def test_fetch_of_altered_file_fails_and_caches_nothing(repo_mirror):
    server, folder = repo_mirror
    _flip_byte(folder / "profile_eval.jsonl")
    with pytest.raises(DataError, match=rf"profile_eval.*{ALOE_FILES['profile_eval'].sha256}"):
        load_pool("profile", "eval", server.url)
    assert not (storage.cache_dir() / "aloe_pools").exists()
    (folder / "personality.jsonl").unlink()
    with pytest.raises(DataError, match="HTTP 404"):
        load_pool("personality", "train", server.url)


def test_unreachable_host_is_a_data_error(monkeypatch, tmp_path):
    monkeypatch.setenv("ALOE_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(aloe_pools, "_RETRY_DELAYS_S", (0.0,))
    with pytest.raises(DataError, match=r"downloading http://127\.0\.0\.1:1/datasets/profile\.jsonl failed"):
        load_pool("profile", "train", "http://127.0.0.1:1")


def test_gcs_folder_source(gcs_emulator):
    remote = f"{gcs_emulator}/aloe_data"
    for file in ALOE_FILES.values():
        storage.write_bytes(storage.join(remote, file.filename), (ALOE_DATA / file.filename).read_bytes())
    assert len(load_pool("profile", "eval", remote)) == 20
    with pytest.raises(DataError, match="does not exist"):
        load_pool("profile", "eval", f"{gcs_emulator}/no_such_folder")
