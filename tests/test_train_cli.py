"""`aloe-jax sft/dpo/export`: user mistakes are one line and exit 2; a run killed with SIGKILL after a checkpoint and
restarted ends with exactly the losses and params of an uninterrupted run; export writes a loadable HF folder."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from aloe_jax.cli import main
from tests.test_packing import make_tree

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_model_dir(folder: pathlib.Path, tokenizer) -> str:
    """A tiny random Llama with the SmolLM2 vocabulary, exported as an HF folder with the real tokenizer."""
    from flax import nnx

    from aloe_jax.models.config import config_from_hf
    from aloe_jax.models.decoder import Decoder
    from aloe_jax.models.weights import export_hf

    cfg = config_from_hf(dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2))
    export_hf(Decoder(cfg, nnx.Rngs(0)), tokenizer, str(folder))
    return str(folder)


def make_trees_file(path: pathlib.Path, n: int) -> str:
    path.write_text("".join(make_tree(i, turns=1 + i % 2).model_dump_json() + "\n" for i in range(n)))
    return str(path)


def write_config(path: pathlib.Path, model: str, data: str, output_dir: str, **extra) -> str:
    cfg = {"objective": "sft", "model": {"path": model, "dtype": "float32"}, "output_dir": output_dir,
           "mesh": {"data": 2, "fsdp": 1, "tensor": -1}, "batch_size": 2, "seed": 0,
           "data": {"path": data, "seq_len": 256, "max_pairs": 2, "seed": 0},
           "optim": {"lr": 3e-3, "warmup_steps": 1}, "checkpoint": {"every_steps": 2, "max_to_keep": 2},
           "log": {"progress_bar": False}}
    for key, value in extra.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def cli_env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALOE_JAX_")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), **extra)
    return env


def cli(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "aloe_jax.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses_by_step(run_dir: str) -> dict[int, float]:
    """The last logged loss of every step (a step logged again after a resume overrides the earlier line)."""
    out = {}
    for line in pathlib.Path(run_dir, "logs", "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:  # hook lines (held-out eval/*) carry their own keys
            out[record["step"]] = record["loss"]
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("train_cli")
    return root, make_model_dir(root / "model", smollm2_tokenizer), make_trees_file(root / "trees.jsonl", 12)


def test_cli_errors_are_one_line_and_exit_2(setup, capsys):
    root, model, data = setup
    config = write_config(root / "sft.yaml", model, data, str(root / "unused"))
    cases = [
        (["sft", "--config", config, "optim.learnig_rate=1"], "optim.learnig_rate: unknown key"),
        (["dpo", "--config", config], "run `aloe-jax sft`"),
        (["sft", "--config", str(root / "missing.yaml")], "does not exist"),
        (["sft", "--config", config, "batch_size=3"], "data × fsdp"),
        (["sft", "--config", config, "data.path=" + str(root / "nope.jsonl")], "nope.jsonl"),
        (["export", str(root), str(root / "out")], "not a trainer run folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)


def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted_run(setup, tmp_path):
    root, model, data = setup
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    env = cli_env(devices=2)
    # max_steps=8 is more than one epoch gives: the data repeats, and the resumed run crosses into its second epoch.
    reference = cli(["sft", "--config", write_config(tmp_path / "a.yaml", model, data, straight, max_steps=8)], env)
    config = write_config(tmp_path / "b.yaml", model, data, killed, max_steps=8)
    victim = cli(["sft", "--config", config], env)
    first_checkpoint = pathlib.Path(killed, "checkpoints", "2")
    deadline = time.time() + 240
    while not first_checkpoint.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert victim.poll() is None, "the run ended before it could be killed:\n" + victim.stdout.read()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not pathlib.Path(killed, "checkpoints", "8").exists()
    resumed = cli(["sft", "--config", config], env)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resuming from the checkpoint of step" in out
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out
    assert "resuming" not in out

    expected = losses_by_step(straight)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6, 7, 8]  # 12 trees / 2 per step: one epoch, then 2 steps more
    assert expected[8] < expected[1]
    got = losses_by_step(killed)
    assert sorted(got) == sorted(expected)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(expected)], rtol=1e-6)

    from flax import nnx

    from aloe_jax.models.loader import load_model

    final = [nnx.state(load_model(run)[0], nnx.Param) for run in (straight, killed)]
    for a, b in zip(*(sorted(nnx.to_flat_state(s), key=lambda kv: str(kv[0])) for s in final)):
        np.testing.assert_allclose(np.asarray(a[1][...]), np.asarray(b[1][...]), rtol=1e-6, atol=1e-7)

    # Export the resumed run's params as an HF folder; loading it back gives the same weights.
    out_dir = str(tmp_path / "exported")
    assert main(["export", killed, out_dir]) == 0
    exported = nnx.state(load_model(out_dir)[0], nnx.Param)
    np.testing.assert_allclose(np.asarray(exported["embed"][...]), np.asarray(final[1]["embed"][...]))
    assert list((tmp_path / "killed" / "logs").glob("events.out.tfevents.*"))  # TensorBoard events
