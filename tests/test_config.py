"""Configs: HF config.json parsing across transformers eras, presets, YAML + overrides, clear errors."""

import json

import pytest

from aloe_jax.core.config import StrictModel, load_config
from aloe_jax.core.errors import ConfigError, ModelLoadError
from aloe_jax.models.config import config_from_hf, read_hf_config
from aloe_jax.models.presets import HF_PRESETS, preset_config
from aloe_jax.models.sharding import MeshConfig

LEGACY_LLAMA31 = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=131072,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
)


def test_legacy_rope_scaling_and_transformers5_rope_parameters_parse_the_same():
    legacy = config_from_hf(LEGACY_LLAMA31)
    modern = {k: v for k, v in LEGACY_LLAMA31.items() if k not in ("rope_theta", "rope_scaling")}
    modern["rope_parameters"] = dict(LEGACY_LLAMA31["rope_scaling"], rope_theta=500000.0)
    assert config_from_hf(modern) == legacy
    assert legacy.rope_scaling.factor == 8.0 and legacy.rope_theta == 500000.0


@pytest.mark.parametrize("name", list(HF_PRESETS))
def test_presets_build_and_round_trip_through_hf_dict(name):
    cfg = preset_config(name)
    assert config_from_hf(cfg.to_hf_dict()) == cfg


def test_preset_parameter_counts_match_the_published_sizes():
    # Published sizes: Llama-3-8B 8.03B, Mistral-7B-v0.3 7.25B, Qwen2-7B 7.62B, OLMo-7B 6.89B, SmolLM2 134.5M.
    expected = {"llama3-8b": 8.03e9, "mistral-7b-v0.3": 7.25e9, "qwen2-7b": 7.62e9, "olmo-7b-0724": 6.89e9,
                "smollm2-135m": 134.5e6}
    for name, size in expected.items():
        assert abs(preset_config(name).num_params() - size) / size < 0.01, name


def test_family_flags():
    assert preset_config("qwen2-7b").qkv_bias and not preset_config("qwen2-7b").o_bias
    assert preset_config("olmo-7b-0724").norm_type == "layernorm"
    assert preset_config("smollm2-135m").tie_word_embeddings


def test_unknown_model_type_names_the_supported_ones():
    with pytest.raises(ConfigError, match="llama, mistral, olmo, qwen2"):
        config_from_hf({**LEGACY_LLAMA31, "model_type": "gpt2"})


def test_mistral_sliding_window_is_rejected_clearly_but_null_window_loads():
    base = dict(HF_PRESETS["mistral-7b-v0.3"])
    assert config_from_hf(base).model_type == "mistral"
    with pytest.raises(ConfigError, match="sliding-window"):
        config_from_hf({**base, "sliding_window": 4096})


def test_qwen2_window_is_ignored_when_disabled():
    cfg = config_from_hf({**HF_PRESETS["qwen2-7b"], "sliding_window": 4096, "use_sliding_window": False})
    assert cfg.model_type == "qwen2"


def test_read_hf_config_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        read_hf_config(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**LEGACY_LLAMA31, "hidden_act": "gelu"}))
    with pytest.raises(ConfigError, match="hidden_act"):
        read_hf_config(tmp_path)


class _Train(StrictModel):
    lr: float = 1e-5
    steps: int = 10


class _Run(StrictModel):
    name: str = "run"
    train: _Train = _Train()
    mesh: MeshConfig = MeshConfig()


def test_yaml_with_base_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\ntrain:\n  lr: 2.0e-5\n  steps: 3\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\ntrain:\n  steps: 7\n")
    cfg = load_config(_Run, tmp_path / "run.yaml", ["train.lr=1e-4", "mesh.fsdp=4"])
    assert (cfg.name, cfg.train.lr, cfg.train.steps, cfg.mesh.fsdp) == ("base", 1e-4, 7, 4)


def test_config_errors_name_the_field(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key"):
        load_config(_Run, tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(_Run, None, ["train.steps=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(_Run, None, ["train.steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(_Run, tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_Run, tmp_path / "broken.yaml")


def test_mesh_shapes():
    assert MeshConfig(data=-1, fsdp=2, tensor=2).shape(8) == (2, 2, 2)
    assert MeshConfig(data=1, fsdp=-1, tensor=2).shape(8) == (1, 4, 2)
    with pytest.raises(ConfigError, match="needs 6 devices"):
        MeshConfig(data=3, fsdp=2, tensor=1).shape(8)
    with pytest.raises(ConfigError, match="not divisible"):
        MeshConfig(data=-1, fsdp=3).shape(8)
