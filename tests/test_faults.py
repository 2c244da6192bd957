"""Faults injected on purpose end as one clear line (exit 2) or a recovery, never a traceback, and lose nothing
committed: an endpoint answering malformed 200s, a corrupt latest checkpoint, unwritable output folders, bad configs, a
full disk, undecodable tree files; and no secret in an endpoint URL reaches any file a run writes."""

import gc
import json
import pathlib

import pytest

from aloe_jax.cli import main
from tests.conftest import SHARED
from tests.fake_openai import LoopbackOpenAI, completion
from tests.test_llm import MALFORMED_200

SECRET = "sk-test-SECRET123"
ALOE_DATA = str(SHARED / "aloe_data")
PROFILES = ["You are a nurse in Lisbon with two cats.", "You are a retired carpenter in Manitoba."]
PERSONALITIES = ["You are blunt and impatient.", "You are warm, curious and chatty."]


class FakeEndpoint(LoopbackOpenAI):
    """An OpenAI-compatible loopback endpoint: answers `reply` to the first `good_requests` requests (all when None),
    then a malformed 200 (`malformed`: content type, body). Its URL carries a fake key in userinfo and query."""

    def __init__(self):
        self.reply, self.good_requests, self.malformed, self.requests = "A", None, None, 0
        super().__init__()
        self.url = f"http://aloe:{SECRET}@127.0.0.1:{self.port}/v1?api_key={SECRET}"

    def respond(self, body: dict) -> tuple[int, str, bytes]:
        self.requests += 1
        if self.good_requests is not None and self.requests > self.good_requests:
            return 200, *self.malformed
        return 200, "application/json", completion(body["model"], self.reply, 5, 1)


@pytest.fixture
def endpoint():
    server = FakeEndpoint()
    yield server
    server.close()


def _assert_no_secret_in(folder: pathlib.Path):
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    leaks = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert leaks == []


def _one_error_line(capsys) -> str:
    """The one error line a command printed (progress bars aside), checked to come without a traceback or a key."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and SECRET not in err
    [line] = [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]
    return line.split("aloe-jax ", 1)[1]


def _trees_config(tmp_path, url: str, turns: int, name: str) -> str:
    (tmp_path / "profiles.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROFILES))
    (tmp_path / "personalities.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PERSONALITIES))
    backend = {"kind": "openai", "model": "m", "base_url": url, "max_retries": 1}
    roles = {r: {"backend": backend, "generation": {"max_tokens": 8}}
             for r in ("user", "extractor", "hinted", "plain", "judge")}
    cfg = {"seed": 3, "roles": roles,
           "trees": {"profiles": str(tmp_path / "profiles.jsonl"),
                     "personalities": str(tmp_path / "personalities.jsonl"),
                     "conversations": 1, "turns": turns, "output": str(tmp_path / name / "trees.jsonl"),
                     "state_dir": str(tmp_path / name / "state")}}
    path = tmp_path / f"{name}.json"  # JSON is YAML
    path.write_text(json.dumps(cfg))
    return str(path)


def test_trees_on_an_endpoint_that_turns_malformed_keeps_committed_turns_and_records_no_key(endpoint, tmp_path, capsys):
    assert main(["trees", "--config", _trees_config(tmp_path, endpoint.url, 1, "good")]) == 0
    records = [json.loads(line) for line in (tmp_path / "good" / "trees.jsonl").read_text().splitlines()]
    assert records[0]["meta"]["roles"]["user"] == f"openai:m@http://127.0.0.1:{endpoint.server.server_address[1]}/v1"
    _assert_no_secret_in(tmp_path / "good")
    printed = capsys.readouterr()
    assert SECRET not in printed.out + printed.err  # the usage table names each backend too

    # Turn 1 takes as many calls as in the run above; every call of turn 2 gets a malformed 200.
    per_turn, endpoint.requests = endpoint.requests, 0
    for kind, malformed in MALFORMED_200.items():
        endpoint.good_requests, endpoint.malformed, endpoint.requests = per_turn, malformed, 0
        name = f"bad-{kind.replace(' ', '-')}"
        assert main(["trees", "--config", _trees_config(tmp_path, endpoint.url, 2, name)]) == 2, kind
        assert "answered 200 with" in _one_error_line(capsys)
        committed = (tmp_path / name / "state" / "turns.jsonl").read_text().splitlines()
        assert [json.loads(line)["turn"] for line in committed] == [0], kind  # the first turn, kept
        _assert_no_secret_in(tmp_path / name)


@pytest.fixture(scope="module")
def tiny_model_folder(tiny_chat_engine, tmp_path_factory):
    """The tiny chat model as an HF folder with tokenizer, as `aloe-jax eval --model` loads it."""
    from aloe_jax.models.weights import export_hf

    folder = tmp_path_factory.mktemp("tiny_chat") / "model"
    export_hf(tiny_chat_engine.model, tiny_chat_engine.tokenizer, str(folder))
    return str(folder)


@pytest.mark.slow
def test_eval_on_an_endpoint_that_turns_malformed_resumes_losing_nothing_and_records_no_key(
        endpoint, tiny_model_folder, tmp_path, capsys):
    endpoint.reply = "4"  # a score the text judge reads
    spec = f"openai:m@{endpoint.url}"
    out = tmp_path / "eval"
    argv = ["eval", "--model", tiny_model_folder, "--simulator", spec, "--judge", spec, "--out", str(out),
            "--aloe-data", ALOE_DATA, "--cases", "1", "--turns", "2", "--quiet", "bootstrap_resamples=20",
            "model.generation.max_tokens=4", "simulator.backend.max_retries=1", "judge.backend.max_retries=1"]
    # Turn 1 of one case is one simulator call and one judge call; from turn 2 on every answer is malformed.
    endpoint.good_requests, endpoint.malformed = 2, MALFORMED_200["empty choices"]
    assert main(argv) == 2
    assert "eval: error: openai:m@http://127.0.0.1" in _one_error_line(capsys)
    committed = [json.loads(line) for line in (out / "turns.jsonl").read_text().splitlines()]
    assert [r["turn"] for r in committed] == [1] and committed[0]["score"] == 4

    endpoint.good_requests = None  # the endpoint recovers: the rerun finishes turn 2 only
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "turns.jsonl").read_text().splitlines()]
    assert [r["turn"] for r in records] == [1, 2] and records[0] == committed[0]
    card = json.loads((out / "protocol.json").read_text())
    assert card["simulator"] == f"openai:m@http://127.0.0.1:{endpoint.server.server_address[1]}/v1"
    assert {"summary.json", "report.md", "protocol.json"} <= {p.name for p in out.iterdir()}
    _assert_no_secret_in(out)


def _truncate_largest_file(folder: pathlib.Path) -> None:
    largest = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(largest.stat().st_size // 2)


# Orbax's reads of the corrupt step are abandoned mid-flight (that is the fault under test): their coroutines are
# collected after the event loop closed, which pytest reports as unraisable warnings.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_readable_one(tmp_path, capsys):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from aloe_jax.core.errors import ModelLoadError
    from aloe_jax.models.decoder import Decoder
    from aloe_jax.models.run_folder import MODEL_DIR, RUN_INFO_FILE, restore_params
    from aloe_jax.train.checkpoint import Checkpointer
    from aloe_jax.train.step import TrainState
    from tests.test_trainer import tiny_cfg

    # A run folder with checkpoints of steps 2 and 4 (different params), then one params file of step 4 cut short.
    run_dir = tmp_path / "run"
    (run_dir / MODEL_DIR).mkdir(parents=True)
    (run_dir / MODEL_DIR / "config.json").write_text(json.dumps(tiny_cfg().to_hf_dict()))
    (run_dir / RUN_INFO_FILE).write_text(json.dumps({"objective": "sft", "base_model": "tiny", "model_type": "llama"}))
    params = nnx.state(Decoder(tiny_cfg(), nnx.Rngs(0)), nnx.Param)
    saved = {step: TrainState(jnp.asarray(step, jnp.int32), jax.tree.map(lambda x: x * step, params),
                              {"count": jnp.asarray(step)}, jax.random.PRNGKey(step)) for step in (2, 4)}
    checkpointer = Checkpointer(str(run_dir))
    for state in saved.values():
        checkpointer.save(state, None, {})
    checkpointer.wait()
    _truncate_largest_file(run_dir / "checkpoints" / "4" / "params")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), saved[2])

    def assert_equal(tree, expected):
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Loading the run folder as a model: the newest readable step, with one warning line naming the broken one.
    assert_equal(restore_params(str(run_dir), None, abstract.params), saved[2].params)
    [warning] = capsys.readouterr().err.splitlines()
    assert "warning: the checkpoint of step 4" in warning and "unreadable" in warning
    # Asked for by its folder, the broken step is one line naming it.
    assert main(["export", str(run_dir / "checkpoints" / "4"), str(tmp_path / "exported")]) == 2
    [error] = capsys.readouterr().err.splitlines()
    assert "the checkpoint of step 4" in error and "unreadable" in error

    # Resuming: the newest readable step; the broken newer one is dropped so that step is trained and saved anew.
    state, step = Checkpointer(str(run_dir)).restore_latest(abstract, None)
    assert step == 2
    assert_equal(state, saved[2])
    assert "step 4" in capsys.readouterr().err
    checkpointer = Checkpointer(str(run_dir))
    assert checkpointer.manager.all_steps() == [2]
    checkpointer.save(saved[4], None, {})
    checkpointer.wait()
    assert checkpointer.manager.all_steps() == [2, 4]

    # Nothing readable: one line naming every broken step, for resume and load alike.
    for step in (2, 4):
        _truncate_largest_file(run_dir / "checkpoints" / str(step) / "params")
    with pytest.raises(ModelLoadError, match="no readable checkpoint .*: steps 4, 2 are unreadable"):
        Checkpointer(str(run_dir)).restore_latest(abstract, None)
    assert main(["export", str(run_dir), str(tmp_path / "exported")]) == 2
    assert "no readable checkpoint" in capsys.readouterr().err.splitlines()[-1]
    gc.collect()  # the abandoned reads' coroutines go now, under this test's warning filter, not in a later test


def _read_only_folder(tmp_path) -> str:
    """A folder no file can be created in: mode 0o555, or for root (whom modes do not stop) a sysfs folder."""
    import os

    if os.geteuid() == 0:
        return "/sys/kernel"
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder)


def test_user_mistakes_are_one_line_before_anything_loads(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(128, 256)))
    (tmp_path / "self.yaml").write_text("base: self.yaml\nseed: 1\n")
    (tmp_path / "trees.jsonl").write_text('{"id": "a"}\n')
    read_only = _read_only_folder(tmp_path)
    cases = [
        (["sft", f"output_dir={a_file}"], "is a file, not a folder"),
        (["sft", f"output_dir={read_only}"], "is not a writable folder"),
        (["eval", "--out", str(a_file)], "is a file, not a folder"),
        (["eval", "--out", read_only], "is not a writable folder"),
        (["export-trees", str(tmp_path / "trees.jsonl"), "--out", str(a_file)], "is a file, not a folder"),
        (["export-trees", str(tmp_path / "trees.jsonl"), "--out", f"{read_only}/out"], "is not a writable folder"),
        (["sft", "--config", str(tmp_path)], "is a folder: pass one of its YAML files"),
        (["sft", "--config", str(tmp_path / "binary.yaml")], "is not a UTF-8 text (YAML) file"),
        (["sft", "--config", str(tmp_path / "self.yaml")], "include each other through base"),
        *((["sft", f"data.{key}={value}"], f"data.{key}: Input should be greater than 0")
          for key in ("seq_len", "max_pairs", "read_threads", "prefetch_batches") for value in (0, -1)),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and message in err, (argv, err)


def test_non_utf8_tree_files_are_one_line_naming_file_and_line(tmp_path, smollm2_tokenizer, capsys):
    from aloe_jax.core.errors import DataError
    from aloe_jax.train.inputs.pipeline import DataConfig, tree_batches
    from tests.test_packing import make_tree

    trees = tmp_path / "trees.jsonl"
    trees.write_bytes(make_tree(0).model_dump_json().encode() + b"\n" + b'{"id": "caf\xe9"}\n')
    assert main(["export-trees", str(trees), "--out", str(tmp_path / "out")]) == 2
    assert f"tree file {trees} line 2 is not UTF-8 text" in _one_error_line(capsys)
    batches = iter(tree_batches(DataConfig(path=str(trees), seq_len=256, shuffle=False), smollm2_tokenizer, 2))
    with pytest.raises(DataError, match=f"{trees}:2: not UTF-8"):
        next(batches)


def test_a_full_disk_is_one_line_and_loses_nothing_committed(endpoint, tmp_path, monkeypatch, capsys):
    import errno
    import os

    from aloe_jax.core import jsonl_log, storage
    from aloe_jax.core.errors import AloeError
    from aloe_jax.train.checkpoint import Checkpointer

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # The turn log: the second turn's append finds the disk full; the first turn's records stay, and a rerun on a
    # disk with space again resumes and finishes.
    real_fsync, appends = os.fsync, []

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("turns.jsonl"):
            appends.append(fd)
            if len(appends) == 2:
                no_space()
        real_fsync(fd)

    config = _trees_config(tmp_path, endpoint.url, 2, "full")
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fsync)
        assert main(["trees", "--config", config]) == 2
    assert "error: the disk is full" in _one_error_line(capsys)
    turns = [r["turn"] for r in jsonl_log.read_complete(str(tmp_path / "full" / "state" / "turns.jsonl"))]
    assert 0 in turns
    assert main(["trees", "--config", config]) == 0
    [tree] = (tmp_path / "full" / "trees.jsonl").read_text().splitlines()
    assert len(json.loads(tree)["turns"]) == 2

    # A whole-file write leaves the old file as it was.
    report = tmp_path / "report.md"
    report.write_text("old")
    with monkeypatch.context() as patch:
        real = storage.tempfile.NamedTemporaryFile
        patch.setattr(storage.tempfile, "NamedTemporaryFile", lambda **kw: _FullFile(real(**kw)))
        with pytest.raises(AloeError, match="the disk is full: writing .*report.md"):
            storage.write_text(report, "new")
    assert report.read_text() == "old" and [p.name for p in tmp_path.glob(".report.md*")] == []

    # A checkpoint save (or the background write of an earlier one) that finds the disk full.
    checkpointer = Checkpointer(str(tmp_path / "run"))
    monkeypatch.setattr(checkpointer.manager, "wait_until_finished", no_space)
    with pytest.raises(AloeError, match="the disk is full"):
        checkpointer.wait()


class _FullFile:
    """A temporary file on a full disk: created, but no byte can be written to it."""

    def __init__(self, file):
        self._file, self.name = file, file.name

    def write(self, data):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()
