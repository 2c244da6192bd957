"""Every YAML under configs/ loads into its config class; the real-run configs fit the slice they name: the mesh
uses exactly its devices, the batch divides over it, the sharded training state fits in device memory, paths are
well-formed gs:// URLs, and all runs share the paper's optimisation settings."""

import functools
import math
import pathlib
import re
import types

import pytest

from aloe_jax.core.config import load_config, read_yaml
from aloe_jax.eval.config import EvalConfig
from aloe_jax.models.presets import preset_config
from aloe_jax.models.sharding import MESH_AXES, partition_spec
from aloe_jax.models.weights import abstract_model
from aloe_jax.train.config import TrainConfig
from data_pipeline.config import DatagenConfig

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
ALL_YAML = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.y*ml"))

# Devices of each named slice, and the memory of one of its devices in GB.
SLICES = {"v5p-8": (4, 95), "v5p-64": (32, 95), "gpu8": (8, 80)}
# Run-file model prefix → (architecture preset, the HF repository whose folder the run must load).
RUN_MODELS = {"llama3-8b": ("llama3-8b", "Meta-Llama-3-8B-Instruct"), "qwen2-7b": ("qwen2-7b", "Qwen2-7B-Instruct"),
              "mistral-7b": ("mistral-7b-v0.3", "Mistral-7B-Instruct-v0.3"),
              "olmo-7b": ("olmo-7b-0724", "OLMo-7B-0724-Instruct-hf")}
RUN_NAME = re.compile(r"runs/(?P<model>[a-z0-9]+-\d+b)-(?P<task>sft|dpo)-(?P<slice>v5p-8|v5p-64|gpu8)\.yaml")
# A bucket name (lowercase letters, digits, - _ .; 3-63 chars, alphanumeric at both ends) and an optional object path.
GCS_URL = re.compile(r"gs://[a-z0-9][-_.a-z0-9]{1,61}[a-z0-9](/[^/\s]+)*/?")


def config_class(rel: str):
    """The config class that claims configs/<rel>, or None."""
    if rel in ("sft.yaml", "dpo.yaml") or rel.startswith(("tpu/", "runs/")):
        return TrainConfig
    return {"datagen.yaml": DatagenConfig, "eval.yaml": EvalConfig}.get(rel)


def strings(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node


def test_every_yaml_is_claimed_by_a_config_class():
    assert ALL_YAML, "no configs found"
    unclaimed = [rel for rel in ALL_YAML if config_class(rel) is None]
    assert not unclaimed, f"no config class loads {unclaimed}: map them in config_class()"


@pytest.mark.parametrize("rel", ALL_YAML)
def test_config_loads_and_its_gcs_paths_are_well_formed(rel):
    cfg = load_config(config_class(rel), CONFIGS / rel)
    for value in strings(cfg.model_dump(mode="json")):
        if value.startswith("gs:"):
            assert GCS_URL.fullmatch(value), f"{rel}: malformed GCS URL {value!r}"


def slice_of(rel: str) -> str | None:
    if rel.startswith("tpu/"):
        return pathlib.Path(rel).stem
    match = RUN_NAME.fullmatch(rel)
    return match["slice"] if match else None


TRAIN_YAML = [rel for rel in ALL_YAML if config_class(rel) is TrainConfig]


@pytest.mark.parametrize("rel", TRAIN_YAML)
def test_mesh_uses_the_slice_and_the_batch_divides_over_it(rel):
    cfg = load_config(TrainConfig, CONFIGS / rel)
    name = slice_of(rel)
    if rel.startswith(("tpu/", "runs/")):
        assert name in SLICES, f"{rel}: name it after a slice ({', '.join(SLICES)}) so its device count is known"
    devices = SLICES[name][0] if name else 8  # the generic configs: any device count (-1 axis), checked on 8
    data, fsdp, tensor = cfg.mesh.shape(devices)  # raises when the mesh does not use exactly these devices
    rows_per_pass = cfg.batch_size // cfg.micro_batches
    assert rows_per_pass % (data * fsdp) == 0, f"{rel}: {rows_per_pass} rows per pass over data×fsdp={data * fsdp}"


@functools.lru_cache(maxsize=None)
def param_axes(preset: str) -> tuple[tuple[tuple, tuple], ...]:
    """(shape, logical axes) of every parameter of a preset architecture (shapes only, nothing allocated)."""
    from flax import nnx

    params = nnx.to_flat_state(nnx.state(abstract_model(preset_config(preset)), nnx.Param))
    return tuple((tuple(v.shape), v.get_metadata().get("logical_axes") or (None,) * len(v.shape)) for _, v in params)


def sharded_bytes_per_device(preset: str, mesh_shape: tuple[int, int, int], bytes_per_param: int) -> float:
    """One device's share of the parameters (× bytes_per_param) under the default sharding rules."""
    mesh = types.SimpleNamespace(shape=dict(zip(MESH_AXES, mesh_shape)))  # partition_spec reads only the sizes
    total = 0.0
    for shape, axes in param_axes(preset):
        spec = partition_spec(axes, shape, mesh)
        ways = math.prod(mesh.shape[a] for a in spec if a is not None)
        total += math.prod(shape) / ways * bytes_per_param
    return total


RUN_YAML = [rel for rel in ALL_YAML if rel.startswith("runs/")]


def test_runs_cover_every_model_task_and_slice():
    expected = {f"runs/{m}-{t}-{s}.yaml" for m in RUN_MODELS for t in ("sft", "dpo") for s in SLICES}
    assert set(RUN_YAML) == expected


@pytest.mark.parametrize("rel", RUN_YAML)
def test_run_reads_and_writes_gcs_and_fits_in_device_memory(rel):
    match = RUN_NAME.fullmatch(rel)
    assert match, f"{rel}: name runs <model>-<sft|dpo>-<slice>.yaml"
    cfg = load_config(TrainConfig, CONFIGS / rel)
    preset, hf_folder = RUN_MODELS[match["model"]]
    assert cfg.objective == match["task"]
    for path in (cfg.model, cfg.output_dir, cfg.data.path):
        assert path and GCS_URL.fullmatch(path), f"{rel}: {path!r} should be a gs:// URL"
    assert cfg.model.rstrip("/").endswith("/" + hf_folder)
    assert cfg.output_dir.rstrip("/").endswith("/" + pathlib.Path(rel).stem)  # one checkpoint folder per run file

    # fp32 master weight + fp32 gradient + two fp32 AdamW moments; DPO keeps a frozen reference copy too.
    assert cfg.param_dtype == "float32" and cfg.compute_dtype == "bfloat16" and cfg.remat == "full"
    # What makes a 7-8B step fit a chip (the compiler's figures: benchmarks/results/tpu_compile/).
    assert cfg.scan_layers and cfg.attention == "blockwise" and 0 < cfg.logits_chunk <= 2048
    bytes_per_param = 16 + (4 if cfg.objective == "dpo" else 0)
    devices, hbm_gb = SLICES[match["slice"]]
    state_gb = sharded_bytes_per_device(preset, cfg.mesh.shape(devices), bytes_per_param) / 1e9
    # Keep a third of the device for activations (≈15 GB with remat at 8192 tokens) and XLA's temporaries.
    assert state_gb < 2 / 3 * hbm_gb, f"{rel}: {state_gb:.1f} GB of state per device of {hbm_gb} GB"


def test_all_runs_share_the_paper_settings_and_the_trainer_task_configs():
    sft, dpo = (load_config(TrainConfig, CONFIGS / f"{t}.yaml") for t in ("sft", "dpo"))
    for rel in RUN_YAML:
        cfg = load_config(TrainConfig, CONFIGS / rel)
        task_default = dpo if cfg.objective == "dpo" else sft
        assert cfg.optim == task_default.optim and cfg.optim.lr == 1e-5, rel
        assert cfg.data.num_epochs == 1 and cfg.data.seq_len == 8192, rel
        # A row is a packed tree of up to max_pairs preference pairs: ≈ 48 pairs per step, the paper's batch.
        assert cfg.batch_size == 4 and cfg.data.max_pairs == 10, rel
        if cfg.objective == "dpo":
            assert cfg.dpo == dpo.dpo and cfg.dpo.beta == 0.9, rel


def test_run_files_only_add_what_differs_from_their_slice():
    """Runs inherit mesh, batch and dtypes from configs/tpu/<slice>.yaml instead of restating them."""
    for rel in RUN_YAML:
        own = read_yaml_without_base(CONFIGS / rel)
        assert set(own) <= {"objective", "model", "output_dir", "data", "dpo"}, rel
        assert set(own["data"]) == {"path"}, rel


def read_yaml_without_base(path: pathlib.Path) -> dict:
    import yaml

    data = yaml.safe_load(path.read_text())
    assert data.pop("base") == f"../tpu/{slice_of(path.relative_to(CONFIGS).as_posix())}.yaml"
    return data


def test_a_mesh_that_does_not_fit_the_slice_is_caught(tmp_path):
    """The checks above can fail: the same run with a v5p-8 mesh on v5p-64, or one chip's worth of sharding."""
    from aloe_jax.core.errors import ConfigError

    cfg = load_config(TrainConfig, CONFIGS / "runs/llama3-8b-sft-v5p-64.yaml", ["mesh={data: 1, fsdp: 4, tensor: 1}"])
    with pytest.raises(ConfigError, match="needs 4 devices"):
        cfg.mesh.shape(32)
    # Llama-3-8B has 8.03e9 parameters: 16 B each is 128.5 GB, more than one chip holds, 32.1 GB over fsdp=4.
    assert 128 < sharded_bytes_per_device("llama3-8b", (1, 1, 1), 16) / 1e9 < 129
    assert 32 < sharded_bytes_per_device("llama3-8b", (1, 4, 1), 16) / 1e9 < 32.3
    assert read_yaml(CONFIGS / "runs/llama3-8b-dpo-v5p-8.yaml")["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
