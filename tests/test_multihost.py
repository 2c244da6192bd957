"""Multi-host path on one machine: two processes with 4 CPU devices each, joined through `jax.distributed` on loopback
(as `aloe-jax sft` does from the ALOE_JAX_* variables), each reading its half of every batch, reproduce the losses of
one process with 8 devices."""

import socket

import numpy as np
import pytest

from tests.test_train_cli import cli, cli_env, losses_by_step, make_model_dir, make_trees_file, write_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_on_loopback_reproduce_one_process_losses(tmp_path, smollm2_tokenizer):
    model = make_model_dir(tmp_path / "model", smollm2_tokenizer)
    data = make_trees_file(tmp_path / "trees.jsonl", 6)
    settings = dict(mesh={"data": 2, "fsdp": 2, "tensor": 2}, batch_size=4, checkpoint={"every_steps": 100})
    single_dir, multi_dir = str(tmp_path / "single"), str(tmp_path / "multi")
    single = cli(["sft", "--config", write_config(tmp_path / "one.yaml", model, data, single_dir, **settings)],
                 cli_env(devices=8))
    port = _free_port()
    config = write_config(tmp_path / "two.yaml", model, data, multi_dir, **settings)
    workers = [cli(["sft", "--config", config],
                   cli_env(devices=4, ALOE_JAX_COORDINATOR=f"127.0.0.1:{port}", ALOE_JAX_NUM_PROCESSES="2",
                           ALOE_JAX_PROCESS_ID=str(i)))
               for i in range(2)]
    outputs = [w.communicate(timeout=400)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n----\n".join(outputs)
    assert "process 1/2 reads rows 2..3" in outputs[1]  # each process really read only its half
    out, _ = single.communicate(timeout=400)
    assert single.returncode == 0, out
    expected, got = losses_by_step(single_dir), losses_by_step(multi_dir)
    assert sorted(expected) == [1, 2] and sorted(got) == [1, 2]
    np.testing.assert_allclose([got[s] for s in (1, 2)], [expected[s] for s in (1, 2)], rtol=1e-5)
