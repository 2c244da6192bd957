"""`aloe-jax compile`: a run's programs compiled for TPU slices by libtpu's compiler on this CPU machine (no TPU), for
tiny architectures so that each compiles in seconds. Needs libtpu (`pip install -e .[tpu]`; CI installs it)."""

import json
import math

import pytest

from aloe_jax.cli import main

TINY = dict(model_type="llama", vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
# The same size for a preset: `arch.FIELD=N` resizes whatever architecture the config names.
TINY_ARCH = ["arch.num_layers=1", "arch.hidden_size=64", "arch.intermediate_size=96", "arch.num_heads=4",
             "arch.num_kv_heads=2", "arch.head_dim=16", "arch.vocab_size=256"]
V5P_HBM_GIB = 95.74  # what XLA:TPU says a v5p chip has


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """An HF folder with only a config.json: compile reads no weights."""
    folder = tmp_path_factory.mktemp("tiny_arch")
    (folder / "config.json").write_text(json.dumps(TINY))
    return str(folder)


@pytest.fixture(scope="module")
def slice_config(tmp_path_factory) -> str:
    """The v5p-8 hardware layer on sft.yaml, in a file whose name names no model (so no preset is inferred)."""
    path = tmp_path_factory.mktemp("slice") / "slice.yaml"
    path.write_text("base: [sft, hardware/v5p-8]\n")
    return str(path)


def run_compile(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["compile", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def compile_json(capsys, *argv: str) -> tuple[int, list[dict]]:
    code, out, _ = run_compile(capsys, *argv, "--json")
    return code, [json.loads(line) for line in out.splitlines()]


@pytest.mark.parametrize("objective", ["sft", "dpo"])
@pytest.mark.parametrize("topology, chips, hosts", [("v5p-8", 4, 1), ("v5p-64", 32, 8)])
def test_train_steps_of_a_slice_config_compile_and_fit(capsys, tiny_model, objective, topology, chips, hosts):
    # A run on the slice (hardware/<slice>.yaml: fsdp 4 on v5p-8, fsdp 4 x tensor 8 on v5p-64; batch 4, remat) on a
    # tiny model.
    run = f"configs/runs/llama3-8b-{objective}-{topology}.yaml"
    code, [report] = compile_json(capsys, "--config", run, "--topology", topology, f"model.path={tiny_model}",
                                  "data.seq_len=128")
    assert code == 0
    assert report["program"] == f"{objective}_step" and report["topology"] == topology
    assert (report["chips"], report["hosts"]) == (chips, hosts)
    assert report["fits"] and 0 < report["peak_gib"] < report["hbm_gib"] == pytest.approx(V5P_HBM_GIB, abs=0.01)
    parts = report["argument_gib"] + report["output_gib"] - report["alias_gib"] + report["temp_gib"]
    assert report["peak_gib"] == pytest.approx(parts, rel=1e-9)
    assert report["free_fraction"] == pytest.approx(1 - report["peak_gib"] / report["hbm_gib"])
    assert report["alias_gib"] > 0  # the state is donated: its buffers are the new state's
    assert report["flops_per_chip"] > 0 and report["model_flops_per_chip"] > 0 and report["compile_s"] > 0
    assert report["tokens_per_chip"] == 4 * 128 / chips
    assert report["roofline_tokens_per_s_per_chip"] > 0 and 0 < report["mfu_ceiling"] <= 1
    assert report["config"] == run and "config.json of" in report["model"]


def test_the_grpo_step_of_an_rl_run_config_compiles_and_fits(capsys, tiny_model):
    # The RL run on v5p-8 (fsdp 4; 16 packed rollout rows of G=4 x K=5 replies, 4 rows per pass) on a tiny model:
    # the batch holds GRPO's fields (per-reply advantages and weights [16, 20], rollout-time log-probs [16, 128]).
    run = "configs/runs/llama3-8b-rl-v5p-8.yaml"
    code, [report] = compile_json(capsys, "--config", run, "--topology", "v5p-8", f"model.path={tiny_model}",
                                  "data.seq_len=128")
    assert code == 0
    assert report["program"] == "grpo_step" and (report["chips"], report["hosts"]) == (4, 1)
    assert report["fits"] and 0 < report["peak_gib"] < report["hbm_gib"]
    assert report["alias_gib"] > 0 and report["flops_per_chip"] > 0 and report["model_flops_per_chip"] > 0
    assert report["tokens_per_chip"] == 16 * 128 / 4
    assert report["shapes"].startswith("batch 16 x 128 tokens (packed rollouts of G=4 x K=5 replies), "
                                       "micro_batches 4, mesh data=1 fsdp=4 tensor=1")


def test_a_run_config_on_gcs_compiles_with_the_preset_its_model_names(capsys):
    code, out, _ = run_compile(capsys, "--config", "configs/runs/llama3-8b-sft-v5p-8.yaml", "--topology", "v5p-8",
                               *TINY_ARCH, "data.seq_len=128")
    assert code == 0
    assert "preset llama3-8b, inferred from the name gs://my-aloe-bucket/models/Meta-Llama-3-8B-Instruct" in out
    assert "sft_step on v5p-8 (v5p:2x2x1: 4 chips, 1 host)" in out and ": fits, " in out


def test_gcs_model_names_map_to_their_presets():
    from aloe_jax.aot.programs import preset_named_in

    names = {"Meta-Llama-3-8B-Instruct": "llama3-8b", "Llama-3.1-8B-Instruct": "llama3.1-8b",
             "Mistral-7B-Instruct-v0.3": "mistral-7b-v0.3", "Qwen2-7B-Instruct": "qwen2-7b",
             "OLMo-7B-0724-Instruct-hf": "olmo-7b-0724", "SmolLM2-135M-Instruct": "smollm2-135m",
             "llama3-8b-sft-v5p-8": "llama3-8b", "my-model": None}
    assert {name: preset_named_in(name) for name in names} == names


def test_eval_generation_program_compiles(capsys, tiny_model):
    code, [report] = compile_json(capsys, "--config", "configs/eval.yaml", "--topology", "v5e-4",
                                  f"model.path={tiny_model}", "cases=10", "turns=2")
    assert code == 0
    assert report["program"] == "generate" and report["chips"] == 4 and report["fits"]
    assert report["flops_per_chip"] > 0 and report["model_flops_per_chip"] > 0
    assert report["tokens_per_chip"] == 10 * 96 / 4  # cases x the model's max_tokens, over the chips
    # 10 cases padded to 12 rows; last prompt ≤ 64 + (64 + 96 + 16) + 64 + 16 = 320 tokens, bucketed to 384.
    assert report["shapes"].startswith("12 rows (10 cases) x 384 prompt tokens")
    assert "96 decode steps" in report["shapes"]


def test_a_step_too_large_for_the_chip_does_not_fit(capsys, tiny_model):
    # A 16M-token vocabulary: 2.1e9 fp32 parameters with AdamW state and gradients exceed a v5e chip's 16 GB.
    code, out, _ = run_compile(capsys, "--config", "configs/sft.yaml", "--topology", "v5e-1", f"model.path={tiny_model}",
                               "arch.vocab_size=16777216", "data.seq_len=128", "batch_size=1")
    assert code == 1
    assert "does not fit by" in out and "RESOURCE_EXHAUSTED" in out
    code, [report] = compile_json(capsys, "--config", "configs/sft.yaml", "--topology", "v5e-1",
                                  f"model.path={tiny_model}", "arch.vocab_size=16777216", "data.seq_len=128",
                                  "batch_size=1")
    assert code == 1 and not report["fits"] and report["peak_gib"] > report["hbm_gib"]
    assert report["hbm_gib"] == pytest.approx(15.75, abs=0.01)


@pytest.mark.parametrize("argv, message", [
    (["--topology", "v5p-7"], "unknown topology 'v5p-7'; known: v5p-8, v5p-16"),
    (["--topology", "v5p-8", "no_such_key=1"], "no_such_key: unknown key"),
    (["--topology", "v5p-8", "model.path=gs://bucket/models/my-model"], "name the architecture with --preset"),
    (["--topology", "v5p-8", "arch.layers=2"], "arch.layers=2: expected arch.FIELD=POSITIVE_INTEGER"),
    (["--topology", "v5p-16"], "needs 4 devices, but 8 are available"),
])
def test_user_errors_are_one_line_with_exit_2(capsys, slice_config, argv, message):
    code, out, err = run_compile(capsys, "--config", slice_config, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


def test_without_libtpu_the_error_says_how_to_install_it(capsys, monkeypatch, slice_config):
    from aloe_jax.aot import topologies

    monkeypatch.setattr(topologies, "libtpu_installed", lambda: False)
    code, _, err = run_compile(capsys, "--config", slice_config, "--topology", "v5p-8")
    assert code == 2 and "pip install -e .[tpu]" in err and len(err.strip().splitlines()) == 1


def test_every_known_slice_has_its_chips_and_hosts():
    from aloe_jax.aot import topologies

    for name, slice_ in topologies.SLICES.items():
        devices = topologies.slice_devices(slice_)
        hosts = len({d.process_index for d in devices})
        assert len(devices) == slice_.chips and hosts == slice_.chips // math.prod(slice_.chips_per_host), name
    assert topologies.SLICES["v5p-64"].topology == "v5p:2x4x4" and topologies.SLICES["v6e-8"].topology == "v6e:2x4"


def test_xla_cost_analysis_counts_a_loop_body_once():
    """Why the report gives model FLOPs beside XLA's: a scan of 10 matmuls costs as much as one to cost_analysis."""
    import jax
    import jax.numpy as jnp

    from aloe_jax.aot import topologies

    device = topologies.slice_devices(topologies.get_slice("v5p-8"))[0]
    on_chip = jax.sharding.SingleDeviceSharding(device)
    x = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=on_chip)
    w = jax.ShapeDtypeStruct((10, 256, 256), jnp.float32, sharding=on_chip)

    def scanned(x, w):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]

    def unrolled(x, w):
        for i in range(10):
            x = jnp.tanh(x @ w[i])
        return x

    flops = {f.__name__: jax.jit(f).lower(x, w).compile().cost_analysis()["flops"] for f in (scanned, unrolled)}
    matmul = 2 * 256**3
    assert flops["unrolled"] >= 10 * matmul and flops["scanned"] < 2 * matmul
