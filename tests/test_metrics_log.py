"""The metrics of a tiny SFT run (with held-out eval/loss) as the tools users read them with: TensorBoard's own event
reader, and a W&B run in offline mode (read back from the run files W&B writes) that a resume of the run folder
continues under the same id."""

import json
import pathlib
import struct
import sys

import pytest

from aloe_jax.core.errors import ConfigError
from aloe_jax.train.config import TrainConfig
from aloe_jax.train.metrics_log import WANDB_RUN_ID_FILE, import_wandb
from aloe_jax.train.trainer import run
from tests.test_train_cli import make_model_dir, make_trees_file

LAST_STEP = 3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, smollm2_tokenizer):
    """(run folder, W&B dir, the W&B run id after the first run, {step: JSONL training record}, {step: JSONL eval
    record}) of a 3-step run with W&B offline, then resumed from its last checkpoint (which runs no steps: a resume
    costs no second compile)."""
    root = tmp_path_factory.mktemp("metrics_log")
    wandb_dir = root / "wandb"
    wandb_dir.mkdir()
    out = root / "run"
    cfg = {"model": {"path": make_model_dir(root / "model", smollm2_tokenizer), "dtype": "float32"},
           "output_dir": str(out), "batch_size": 2, "mesh": {"data": 2, "fsdp": 1, "tensor": -1},
           "optim": {"lr": 3e-3, "warmup_steps": 1},
           "data": {"path": make_trees_file(root / "train.jsonl", 8), "seq_len": 256, "max_pairs": 2},
           "eval_data": {"path": make_trees_file(root / "held_out.jsonl", 2), "every": 2},
           "max_steps": LAST_STEP, "checkpoint": {"every_steps": LAST_STEP},
           "log": {"progress_bar": False, "wandb": {"project": "aloe-test", "run": "tiny", "tags": ["ci"]}}}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")  # no network, no account
        env.setenv("WANDB_DIR", str(wandb_dir))
        env.setenv("WANDB_SILENT", "true")
        env.delenv("WANDB_API_KEY", raising=False)
        run(TrainConfig.model_validate(cfg))
        first_id = (out / "logs" / WANDB_RUN_ID_FILE).read_text().strip()
        run(TrainConfig.model_validate(cfg))
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if "loss" in r}
    evals = {r["step"]: r for r in records if "eval/loss" in r}
    assert sorted(train) == [1, 2, 3] and sorted(evals) == [2, 3]
    return out, wandb_dir, first_id, train, evals


@pytest.mark.slow  # the shared tiny run: about 25 s
def test_tensorboards_own_reader_reads_the_training_and_held_out_scalars(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _, train, evals = tiny_run
    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert scalars["train/loss"] == pytest.approx({step: r["loss"] for step, r in train.items()}, rel=1e-6)
    assert scalars["train/tokens_per_s"].keys() == train.keys()
    assert scalars["eval/loss"] == pytest.approx({step: r["eval/loss"] for step, r in evals.items()}, rel=1e-6)


_WANDB_BLOCK = 32768  # W&B's run file is a LevelDB-style log: 32 KiB blocks of (crc32, length, type) chunks
_WANDB_FILE_HEADER = 7  # ":W&B", a 2-byte magic and a version byte


def _wandb_records(path: pathlib.Path):
    """The `Record` protos of one W&B run file (`run-<id>.wandb`), chunks reassembled."""
    from wandb.proto import wandb_internal_pb2

    data, pos, record = path.read_bytes(), _WANDB_FILE_HEADER, b""
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    while pos + 7 <= len(data):
        if _WANDB_BLOCK - pos % _WANDB_BLOCK < 7:  # too short for a chunk header: the block's padding
            pos += _WANDB_BLOCK - pos % _WANDB_BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zeroed tail of a file still being written
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        record = chunk if kind in (1, 2) else record + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(record)


def _wandb_runs(wandb_dir: pathlib.Path) -> list[tuple[str, dict, dict[int, dict]]]:
    """(run id, config, {step: logged metrics}) of every offline W&B run under `wandb_dir`, oldest first."""
    runs = []
    for path in sorted(wandb_dir.rglob("run-*.wandb")):
        run_id, config, history = None, {}, {}
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
                config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
            elif kind == "history":
                # W&B 0.31 writes each name as a one-element `nested_key`; older versions wrote `key`.
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                history[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
        runs.append((run_id, config, history))
    return runs


@pytest.mark.slow
def test_wandb_gets_the_logged_metrics_and_config_and_a_resume_continues_the_same_run(tiny_run):
    out, wandb_dir, first_id, train, evals = tiny_run
    runs = _wandb_runs(wandb_dir)
    assert len(runs) == 2  # the first run and its resume
    assert [run_id for run_id, _, _ in runs] == [first_id, first_id]
    assert (out / "logs" / WANDB_RUN_ID_FILE).read_text().strip() == first_id
    history = {step: metrics for _, _, steps in runs for step, metrics in steps.items()}
    assert sorted(history) == [1, 2, 3]
    for step, record in train.items():
        assert history[step]["train/loss"] == pytest.approx(record["loss"], rel=1e-6)
        assert history[step]["train/tokens"] == record["tokens"]
    for step, record in evals.items():
        assert history[step]["eval/loss"] == pytest.approx(record["eval/loss"], rel=1e-6)
    for _, config, _ in runs:  # the resolved config, defaults included
        assert config["max_steps"] == LAST_STEP and config["output_dir"] == str(out)
        assert config["optim"]["schedule"] == "linear"
        assert config["log"]["wandb"] == {"project": "aloe-test", "run": "tiny", "entity": None, "group": None,
                                          "tags": ["ci"]}


def test_wandb_configured_but_not_installed_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when it is not installed
    with pytest.raises(ConfigError, match=r"^log\.wandb is set but wandb is not installed: pip install 'aloe-jax"):
        import_wandb()
