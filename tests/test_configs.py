"""Every YAML under configs/ loads into its config class, alone or composed; the package ships every one of them by
name; the real-run configs are `base: [objective, model, hardware]` (RL runs `[rl, model]`, restating the hardware
layer) and fit the slice they name (the mesh uses exactly its devices, the batch divides over it, the sharded
training state fits in device memory, paths are well-formed gs:// URLs, all SFT/DPO runs share the paper's
optimisation settings, RL rows fit G × K replies). Then the loading machinery itself: list-`base:` order, cycles,
errors that name the override or the file and suggest the closest key, YAML errors with their line and column."""

import functools
import math
import pathlib
import re
import types

import pytest
import yaml

from aloe_jax.core.config import (StrictModel, dump_config, load_config, packaged_config_names, packaged_config_path,
                                  read_yaml)
from aloe_jax.core.errors import ConfigError
from aloe_jax.eval.config import EvalConfig
from aloe_jax.models.presets import preset_config
from aloe_jax.models.sharding import MESH_AXES, MeshConfig, partition_spec
from aloe_jax.models.weights import abstract_model
from aloe_jax.rl.config import RLConfig
from aloe_jax.train.config import TrainConfig
from data_pipeline.config import DatagenConfig

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
ALL_YAML = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.y*ml"))
# Layers are not whole configs: each is composed onto the objective it is written for.
LAYER_FOLDERS = ("models/", "hardware/")

# Devices of each named slice, and the memory of one of its devices in GB.
SLICES = {"v5p-8": (4, 95), "v5p-64": (32, 95), "gpu8": (8, 80)}
# Run-file model prefix → (architecture preset, the HF repository whose folder the run must load).
RUN_MODELS = {"llama3-8b": ("llama3-8b", "Meta-Llama-3-8B-Instruct"), "qwen2-7b": ("qwen2-7b", "Qwen2-7B-Instruct"),
              "mistral-7b": ("mistral-7b-v0.3", "Mistral-7B-Instruct-v0.3"),
              "olmo-7b": ("olmo-7b-0724", "OLMo-7B-0724-Instruct-hf")}
RUN_NAME = re.compile(r"runs/(?P<model>[a-z0-9]+-\d+b)-(?P<task>sft|dpo|rl)-(?P<slice>v5p-8|v5p-64|gpu8)\.yaml")
# Online RL (`aloe-jax rl`) runs exist for one model on the single-host slices.
RL_RUNS = {"runs/llama3-8b-rl-v5p-8.yaml", "runs/llama3-8b-rl-gpu8.yaml"}
OBJECTIVE_OF_TASK = {"sft": "sft", "dpo": "dpo", "rl": "grpo"}
# A bucket name (lowercase letters, digits, - _ .; 3-63 chars, alphanumeric at both ends) and an optional object path.
GCS_URL = re.compile(r"gs://[a-z0-9][-_.a-z0-9]{1,61}[a-z0-9](/[^/\s]+)*/?")


def config_class(rel: str):
    """The config class that claims configs/<rel>, or None."""
    if rel == "rl.yaml" or (rel.startswith("runs/") and "-rl-" in rel):
        return RLConfig
    if rel in ("sft.yaml", "dpo.yaml") or rel.startswith(("runs/", *LAYER_FOLDERS)):
        return TrainConfig
    return {"datagen.yaml": DatagenConfig, "eval.yaml": EvalConfig}.get(rel)


def composed(rel: str, tmp_path: pathlib.Path) -> pathlib.Path:
    """configs/<rel> itself, or for a layer a file that puts it on top of sft.yaml (what a run file does)."""
    if not rel.startswith(LAYER_FOLDERS):
        return CONFIGS / rel
    path = tmp_path / "composed.yaml"
    path.write_text(yaml.safe_dump({"base": [str(CONFIGS / "sft.yaml"), str(CONFIGS / rel)]}))
    return path


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
def test_config_loads_and_its_gcs_paths_are_well_formed(rel, tmp_path):
    cfg = load_config(config_class(rel), composed(rel, tmp_path))
    for value in strings(cfg.model_dump(mode="json")):
        if value.startswith("gs:"):
            assert GCS_URL.fullmatch(value), f"{rel}: malformed GCS URL {value!r}"


def test_layers_hold_only_their_part():
    """A model file names the weights, a hardware file never picks an objective, a model or the data."""
    for rel in ALL_YAML:
        own = yaml.safe_load((CONFIGS / rel).read_text())
        if rel.startswith("models/"):
            assert own == {"model": {"path": own["model"]["path"]}}, rel
        elif rel.startswith("hardware/"):
            assert "base" not in own and "objective" not in own and "path" not in own["model"], rel
            assert set(own["data"]) <= {"seq_len", "max_pairs"}, rel


def test_the_package_ships_every_config_by_name():
    assert packaged_config_names() == [rel.removesuffix(".yaml") for rel in ALL_YAML]
    for name in ("eval", "sft.yaml", "runs/llama3-8b-sft-v5p-8"):
        assert pathlib.Path(packaged_config_path(name)).read_text() == (CONFIGS / name).with_suffix(".yaml").read_text()
    assert packaged_config_path("runs/no-such-run") is None


@pytest.mark.parametrize("name", [rel.removesuffix(".yaml") for rel in ALL_YAML if not rel.startswith(LAYER_FOLDERS)])
def test_a_packaged_name_loads_what_its_file_does_and_dump_config_round_trips(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder in sight: the name alone must find it
    cls = config_class(name + ".yaml")
    cfg = load_config(cls, name)
    assert cfg == load_config(cls, CONFIGS / f"{name}.yaml")
    (tmp_path / "printed.yaml").write_text(dump_config(cfg))
    assert load_config(cls, tmp_path / "printed.yaml") == cfg


def test_an_unknown_config_name_suggests_the_packaged_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"'evall' does not exist .*did you mean the packaged config 'eval'"):
        load_config(EvalConfig, "evall")


def slice_of(rel: str) -> str | None:
    if rel.startswith("hardware/"):
        return pathlib.Path(rel).stem
    match = RUN_NAME.fullmatch(rel)
    return match["slice"] if match else None


TRAIN_YAML = [rel for rel in ALL_YAML if config_class(rel) in (TrainConfig, RLConfig)]


@pytest.mark.parametrize("rel", TRAIN_YAML)
def test_mesh_uses_the_slice_and_the_batch_divides_over_it(rel, tmp_path):
    cfg = load_config(config_class(rel), composed(rel, tmp_path))
    name = slice_of(rel)
    if rel.startswith(("hardware/", "runs/")):
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
    assert set(RUN_YAML) == expected | RL_RUNS
    assert {rel for rel in ALL_YAML if rel.startswith(LAYER_FOLDERS)} == (
        {f"models/{m}.yaml" for m in RUN_MODELS} | {f"hardware/{s}.yaml" for s in SLICES})


@pytest.mark.parametrize("rel", RUN_YAML)
def test_run_reads_and_writes_gcs_and_fits_in_device_memory(rel):
    match = RUN_NAME.fullmatch(rel)
    assert match, f"{rel}: name runs <model>-<sft|dpo|rl>-<slice>.yaml"
    cfg = load_config(config_class(rel), CONFIGS / rel)
    preset, hf_folder = RUN_MODELS[match["model"]]
    assert cfg.objective == OBJECTIVE_OF_TASK[match["task"]]
    # An RL run's data are its rollouts: no data.path.
    for path in (cfg.model.path, cfg.output_dir, *([cfg.data.path] if cfg.objective != "grpo" else [])):
        assert path and GCS_URL.fullmatch(path), f"{rel}: {path!r} should be a gs:// URL"
    assert cfg.model.path.rstrip("/").endswith("/" + hf_folder)
    assert cfg.output_dir.rstrip("/").endswith("/" + pathlib.Path(rel).stem)  # one checkpoint folder per run file

    # fp32 master weight + fp32 gradient + two fp32 AdamW moments; DPO (and GRPO with a KL term) keeps a frozen
    # reference copy too.
    assert cfg.model.param_dtype == "float32" and cfg.model.dtype == "bfloat16" and cfg.remat == "full"
    # What makes a 7-8B step fit a chip (the compiler's figures: benchmarks/results/tpu_compile/).
    assert cfg.scan_layers and cfg.attention == "blockwise" and 0 < cfg.logits_chunk <= 2048
    holds_reference = cfg.objective == "dpo" or (cfg.objective == "grpo" and cfg.grpo.kl_coef > 0)
    bytes_per_param = 16 + (4 if holds_reference else 0)
    devices, hbm_gb = SLICES[match["slice"]]
    state_gb = sharded_bytes_per_device(preset, cfg.mesh.shape(devices), bytes_per_param) / 1e9
    # Keep a third of the device for activations (≈15 GB with remat at 8192 tokens) and XLA's temporaries.
    assert state_gb < 2 / 3 * hbm_gb, f"{rel}: {state_gb:.1f} GB of state per device of {hbm_gb} GB"


def test_all_runs_share_the_paper_settings_and_the_trainer_task_configs():
    sft, dpo = (load_config(TrainConfig, CONFIGS / f"{t}.yaml") for t in ("sft", "dpo"))
    for rel in sorted(set(RUN_YAML) - RL_RUNS):
        cfg = load_config(TrainConfig, CONFIGS / rel)
        task_default = dpo if cfg.objective == "dpo" else sft
        assert cfg.optim == task_default.optim and cfg.optim.lr == 1e-5, rel
        assert cfg.data.num_epochs == 1 and cfg.data.seq_len == 8192, rel
        # A row is a packed tree of up to max_pairs preference pairs: ≈ 48 pairs per step, the paper's batch.
        assert cfg.batch_size == 4 and cfg.data.max_pairs == 10, rel
        if cfg.objective == "dpo":
            assert cfg.dpo == dpo.dpo and cfg.dpo.beta == 0.9, rel


def test_rl_runs_share_their_settings_and_fit_their_rollouts():
    rl = load_config(RLConfig, CONFIGS / "rl.yaml")
    for rel in sorted(RL_RUNS):
        cfg = load_config(RLConfig, CONFIGS / rel)
        assert cfg.grpo == rl.grpo.model_copy(update={"budget_tokens": cfg.rollout.generation.max_tokens}), rel
        assert cfg.rollout.group_size == 4 and cfg.rollout.turns == 5 and cfg.data.seq_len == 8192, rel
        # A row holds K turns of a user message (≤ the simulator's max_tokens) and G replies (≤ max_tokens), with
        # ≤ 8 template tokens around each message and 64 before the first.
        message = 8
        row = 64 + cfg.rollout.turns * (cfg.simulator.generation.max_tokens + message
                                        + cfg.rollout.group_size * (cfg.rollout.generation.max_tokens + message))
        assert row <= cfg.data.seq_len, f"{rel}: {row} tokens of G x K replies exceed data.seq_len"
        # Simulator and judge off the accelerators: an OpenAI-compatible endpoint, so the judge parses text.
        assert cfg.simulator.backend.kind == cfg.judge.backend.kind == "openai" and cfg.judge.method == "text", rel


def test_run_files_are_objective_model_hardware_plus_their_own_paths():
    """Runs inherit everything from their three layers instead of restating it; an RL run restates its hardware
    layer (whose data.max_pairs is no key of an RL row) and must agree with it."""
    for rel in sorted(RL_RUNS):
        match = RUN_NAME.fullmatch(rel)
        own = yaml.safe_load((CONFIGS / rel).read_text())
        hardware = yaml.safe_load((CONFIGS / f"hardware/{match['slice']}.yaml").read_text())
        assert own.pop("base") == ["../rl.yaml", f"../models/{match['model']}.yaml"], rel
        for key in ("model", "remat", "scan_layers", "attention", "logits_chunk", "mesh"):
            assert own[key] == hardware[key], f"{rel}: {key}"
        assert own["data"] == {"seq_len": hardware["data"]["seq_len"]}, rel
        assert own["output_dir"].rstrip("/").endswith("/" + pathlib.Path(rel).stem), rel
    for rel in sorted(set(RUN_YAML) - RL_RUNS):
        match = RUN_NAME.fullmatch(rel)
        own = yaml.safe_load((CONFIGS / rel).read_text())
        assert own.pop("base") == [f"../{match['task']}.yaml", f"../models/{match['model']}.yaml",
                                   f"../hardware/{match['slice']}.yaml"], rel
        assert own == {"output_dir": own["output_dir"], "data": {"path": own["data"]["path"]}}, rel


def test_a_mesh_that_does_not_fit_the_slice_is_caught():
    """The checks above can fail: the same run with a v5p-8 mesh on v5p-64, or one chip's worth of sharding."""
    cfg = load_config(TrainConfig, CONFIGS / "runs/llama3-8b-sft-v5p-64.yaml", ["mesh={data: 1, fsdp: 4, tensor: 1}"])
    with pytest.raises(ConfigError, match="needs 4 devices"):
        cfg.mesh.shape(32)
    # Llama-3-8B has 8.03e9 parameters: 16 B each is 128.5 GB, more than one chip holds, 32.1 GB over fsdp=4.
    assert 128 < sharded_bytes_per_device("llama3-8b", (1, 1, 1), 16) / 1e9 < 129
    assert 32 < sharded_bytes_per_device("llama3-8b", (1, 4, 1), 16) / 1e9 < 32.3
    assert read_yaml(CONFIGS / "runs/llama3-8b-dpo-v5p-8.yaml")["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}


# The loading machinery, on a small config class.

class _Train(StrictModel):
    lr: float = 1e-5
    steps: int = 10


class _Run(StrictModel):
    name: str = "run"
    tag: str = ""
    train: _Train = _Train()
    mesh: MeshConfig = MeshConfig()


class _Data(StrictModel):
    path: str
    seq_len: int = 8


class _WithData(StrictModel):
    data: _Data


def write(folder: pathlib.Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def test_list_base_applies_in_order_then_the_files_own_keys(tmp_path):
    write(tmp_path, {
        "objective.yaml": "name: objective\ntag: objective\ntrain: {lr: 1.0e-3, steps: 1}\n",
        "layers/model.yaml": "name: model\ntrain: {steps: 2}\n",
        "layers/hardware.yaml": "train: {steps: 3}\nmesh: {fsdp: 4}\n",
        "runs/run.yaml": "base: [../objective.yaml, ../layers/model.yaml, ../layers/hardware.yaml]\nname: run\n",
        "runs/reversed.yaml": "base: [../layers/hardware.yaml, ../layers/model.yaml, ../objective.yaml]\n",
    })
    cfg = load_config(_Run, tmp_path / "runs/run.yaml")
    # Each later base overrides the earlier ones key by key (sections merge), the file's own keys win over all.
    assert (cfg.name, cfg.tag, cfg.train.lr, cfg.train.steps, cfg.mesh.fsdp) == ("run", "objective", 1e-3, 3, 4)
    cfg = load_config(_Run, tmp_path / "runs/reversed.yaml")
    assert (cfg.name, cfg.train.steps, cfg.mesh.fsdp) == ("objective", 1, 4)


def test_a_single_base_a_nested_base_and_a_packaged_name_still_work(tmp_path):
    write(tmp_path, {"a.yaml": "name: a\ntrain: {steps: 5}\n", "b.yaml": "base: a.yaml\ntag: b\n",
                     "c.yaml": "base: [b.yaml]\ntrain: {lr: 0.5}\n"})
    cfg = load_config(_Run, tmp_path / "c.yaml")
    assert (cfg.name, cfg.tag, cfg.train.lr, cfg.train.steps) == ("a", "b", 0.5, 5)
    # A base that is no file beside it is looked up among the packaged configs.
    (tmp_path / "my-run.yaml").write_text("base: [sft, hardware/v5p-8]\noutput_dir: mine\n")
    cfg = load_config(TrainConfig, tmp_path / "my-run.yaml")
    assert (cfg.objective, cfg.mesh.fsdp, cfg.output_dir) == ("sft", 4, "mine")
    (tmp_path / "bad.yaml").write_text("base: [nowhere.yaml]\n")
    with pytest.raises(ConfigError, match=r"base 'nowhere.yaml' is neither a file .* nor the name of a packaged"):
        load_config(_Run, tmp_path / "bad.yaml")


def test_bases_on_gcs_resolve_beside_the_file(gcs_emulator):
    from aloe_jax.core import storage

    storage.write_text(f"{gcs_emulator}/configs/common/base.yaml", "name: base\ntrain: {steps: 4}\n")
    storage.write_text(f"{gcs_emulator}/configs/runs/run.yaml", "base: [../common/base.yaml]\ntag: run\n")
    cfg = load_config(_Run, f"{gcs_emulator}/configs/runs/run.yaml", ["train.lr=0.5"])
    assert (cfg.name, cfg.tag, cfg.train.steps, cfg.train.lr) == ("base", "run", 4, 0.5)


def test_a_base_cycle_is_one_clear_error(tmp_path):
    write(tmp_path, {"a.yaml": "base: [b.yaml]\n", "b.yaml": "base: sub/../c.yaml\n", "c.yaml": "base: [a.yaml]\n",
                     "self.yaml": "base: self.yaml\n", "sub/.keep": ""})
    with pytest.raises(ConfigError, match=r"include each other through base: .*a\.yaml → .*b\.yaml → .*c\.yaml → "
                                          r".*a\.yaml$"):
        read_yaml(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="include each other"):
        read_yaml(tmp_path / "self.yaml")
    # The same file reached twice without a loop (a diamond) is no cycle.
    write(tmp_path, {"d.yaml": "base: [e.yaml, f.yaml]\n", "e.yaml": "base: g.yaml\n", "f.yaml": "base: g.yaml\n",
                     "g.yaml": "name: g\n"})
    assert read_yaml(tmp_path / "d.yaml") == {"name": "g"}


def test_an_override_error_names_the_override_and_suggests_the_key(tmp_path):
    (tmp_path / "run.yaml").write_text("train: {lr: 1.0e-4}\n")
    with pytest.raises(ConfigError) as err:
        load_config(_Run, tmp_path / "run.yaml", ["train.lrr=1e-5"])
    assert str(err.value) == "override 'train.lrr=1e-5': train.lrr: unknown key (did you mean train.lr?)"
    with pytest.raises(ConfigError, match=r"^override 'train.steps=many': train\.steps: Input should be a valid int"):
        load_config(_Run, tmp_path / "run.yaml", ["train.steps=many"])
    # A misplaced key is matched by its last part; a section that does not exist names the override too.
    with pytest.raises(ConfigError, match=r"^override 'lr=1': lr: unknown key \(did you mean train\.lr\?\)$"):
        load_config(_Run, None, ["lr=1"])
    with pytest.raises(ConfigError, match=r"^override 'trian.lr=1': trian: unknown key \(did you mean train\?\)$"):
        load_config(_Run, None, ["trian.lr=1"])
    (tmp_path / "mesh.yaml").write_text("mesh: {data: 1, fsdp: 2, tensor: 1}\n")
    with pytest.raises(ConfigError, match=r"^override 'mesh=\{fsdpp: 2\}': mesh\.fsdpp: unknown key \(did you mean "
                                          r"mesh\.fsdp\?\)$"):
        load_config(_Run, tmp_path / "mesh.yaml", ["mesh={fsdpp: 2}"])
    # A section replaced by an override answers for what it now lacks, not the file whose section it replaced.
    (tmp_path / "data.yaml").write_text("data: {path: trees.jsonl}\n")
    with pytest.raises(ConfigError, match=r"^override 'data=\{seq_len: 4\}': data\.path: Field required$"):
        load_config(_WithData, tmp_path / "data.yaml", ["data={seq_len: 4}"])


def test_a_bad_key_in_a_file_names_that_file_among_its_bases(tmp_path):
    write(tmp_path, {"base.yaml": "train: {stepz: 3}\n", "run.yaml": "base: base.yaml\ntrain: {lr: 1.0e-4}\nnam: x\n"})
    with pytest.raises(ConfigError) as err:
        load_config(_Run, tmp_path / "run.yaml", ["train.steps=4"])
    base, run = repr(str(tmp_path / "base.yaml")), repr(str(tmp_path / "run.yaml"))
    assert str(err.value) == (f"config file {base}: train.stepz: unknown key (did you mean train.steps?); "
                              f"config file {run}: nam: unknown key (did you mean name?)")


def test_yaml_syntax_errors_keep_their_line_and_column(tmp_path):
    (tmp_path / "broken.yaml").write_text("name: ok\ntrain:\n  lr: 1\n   steps: 2\n")
    with pytest.raises(ConfigError, match=r"^config file '.*broken\.yaml' line 4, column 9: not valid YAML, mapping "
                                          r"values are not allowed here$"):
        load_config(_Run, tmp_path / "broken.yaml")
    # An error in a base names the base.
    write(tmp_path, {"run.yaml": "base: [unclosed.yaml]\n", "unclosed.yaml": "name: x\nmesh: [1, 2\n"})
    with pytest.raises(ConfigError, match=r"^config file '.*unclosed\.yaml' line 3, column 1: not valid YAML"):
        load_config(_Run, tmp_path / "run.yaml")
