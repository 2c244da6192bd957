"""Fits the tools researchers already use: TRL's DPOTrainer and SFTTrainer train on the `export-trees` TRL exports;
our trainer reads the tree schema from Parquet and HF `datasets` folders with the loss it gets from JSONL, checks its
data paths before any model loads, and repeats the data when `max_steps` asks for more; exported config.json and
tokenizer files read the same under transformers 4.x's rules and 5."""

import json
import pathlib

import numpy as np
import pytest

from aloe_jax.cli import main
from aloe_jax.core.errors import DataError
from aloe_jax.train.config import TrainConfig
from aloe_jax.train.trainer import run
from tests.test_export import _trees as judged_and_unjudged_trees
from tests.test_export import _write
from tests.test_packing import make_tree
from tests.test_train_cli import losses_by_step, make_model_dir


@pytest.mark.slow
def test_trl_dpo_and_sft_trainers_train_one_step_on_the_trl_exports(tmp_path, smollm2_tokenizer):
    import datasets
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    tokenizer = smollm2_tokenizer  # SmolLM2's vocabulary with our chat template
    torch.manual_seed(0)
    tiny = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                    max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    # A folder, not a model object: DPOTrainer builds its reference model from the policy's path.
    model = str(tmp_path / "tiny")
    transformers.LlamaForCausalLM(tiny).save_pretrained(model)
    trees = _write(tmp_path / "trees.jsonl", judged_and_unjudged_trees("t", 6))
    trainers = {"trl-dpo": (DPOTrainer, DPOConfig), "trl-sft": (SFTTrainer, SFTConfig)}
    for fmt, (trainer_class, config_class) in trainers.items():
        assert main(["export-trees", trees, "--out", str(tmp_path / fmt), "--format", fmt]) == 0
        rows = datasets.load_dataset("parquet", data_files=str(tmp_path / fmt / "train.parquet"))["train"]
        args = config_class(output_dir=str(tmp_path / f"out-{fmt}"), max_steps=1, per_device_train_batch_size=2,
                            max_length=256, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True)
        trainer = trainer_class(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
        result = trainer.train()
        assert result.global_step == 1 and np.isfinite(result.training_loss), fmt


def _train_config(tmp_path, model: str, data: str, **extra) -> TrainConfig:
    return TrainConfig.model_validate({
        "model": {"path": model, "dtype": "float32"}, "output_dir": str(tmp_path), "batch_size": 2,
        "mesh": {"data": 2, "fsdp": 1, "tensor": -1}, "optim": {"lr": 3e-3, "warmup_steps": 1},
        "data": {"path": data, "seq_len": 256, "max_pairs": 2}, "log": {"progress_bar": False}, **extra})


@pytest.fixture(scope="module")
def model_and_trees(tmp_path_factory, smollm2_tokenizer):
    """(tiny model folder, 4 trees as JSONL)."""
    root = tmp_path_factory.mktemp("interop")
    trees = [make_tree(i, turns=1 + i % 2) for i in range(4)]
    return make_model_dir(root / "model", smollm2_tokenizer), _write(root / "trees.jsonl", trees)


@pytest.mark.slow
def test_trainer_on_parquet_and_datasets_folder_matches_jsonl_and_max_steps_repeats_the_data(tmp_path,
                                                                                            model_and_trees, capsys):
    import datasets

    model, jsonl = model_and_trees
    assert main(["export-trees", jsonl, "--out", str(tmp_path / "export"), "--format", "trees"]) == 0
    parquet = str(tmp_path / "export" / "train.parquet")
    datasets.load_dataset("parquet", data_files=parquet)["train"].save_to_disk(str(tmp_path / "hf"))
    # 4 trees in rows of 2 are 2 steps an epoch: max_steps=3 runs 3 steps over 2 epochs instead of stopping at 2.
    run(_train_config(tmp_path / "jsonl", model, jsonl, max_steps=3))
    assert "8 trees over 2 epoch(s) → 4 steps" in capsys.readouterr().out
    first = losses_by_step(str(tmp_path / "jsonl"))
    assert sorted(first) == [1, 2, 3]
    for name, path in (("parquet", parquet), ("hf", str(tmp_path / "hf"))):
        run(_train_config(tmp_path / name, model, path, max_steps=1))
        np.testing.assert_allclose(losses_by_step(str(tmp_path / name))[1], first[1], rtol=1e-6, err_msg=name)


def test_a_wrong_data_path_fails_in_one_line_before_any_model_loads(tmp_path, model_and_trees, monkeypatch, capsys):
    from aloe_jax.models import loader

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before the data paths were checked")

    monkeypatch.setattr(loader, "load_model", no_loading)
    model, jsonl = model_and_trees
    with pytest.raises(DataError, match="tree data .*trees.jsnol.* does not exist"):
        run(_train_config(tmp_path, model, jsonl.replace(".jsonl", ".jsnol")))
    with pytest.raises(DataError, match="tree data .*held_out.jsonl.* does not exist"):
        run(_train_config(tmp_path, model, jsonl, eval_data={"path": str(tmp_path / "held_out.jsonl")}))
    folder = tmp_path / "not_data"
    folder.mkdir()
    (folder / "notes.txt").write_text("hi")
    config = tmp_path / "sft.yaml"
    config.write_text(json.dumps(_train_config(tmp_path, model, str(folder)).model_dump(mode="json")))
    assert main(["sft", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a folder with no ArrayRecord files, HF datasets folder" in err


# Llama 3.1's config.json as the Hub serves it (written by transformers 4.4x), the fields our reader takes.
LLAMA31 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 160, "hidden_size": 64,
           "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008],
           "rope_theta": 500000.0, "torch_dtype": "bfloat16",
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
# What transformers 4.x's rope_config_validation requires of each rope_scaling type (it warns about any other key).
RULES_4X = {"llama3": {"rope_type", "factor", "original_max_position_embeddings", "low_freq_factor",
                       "high_freq_factor"}}


def _rope_as_transformers_4_reads(config: dict) -> tuple[float, dict | None]:
    """(theta, scaling) by transformers 4.x's rules: top-level `rope_theta` (default 10000) and `rope_scaling` with
    exactly its type's keys; `rope_parameters` is not a field there."""
    scaling = config.get("rope_scaling")
    if scaling is not None:
        assert set(scaling) == RULES_4X[scaling["rope_type"]], scaling
    return config.get("rope_theta", 10000.0), scaling


def test_exported_config_and_tokenizer_read_alike_under_transformers_4_rules_and_5(tmp_path, smollm2_tokenizer):
    from flax import nnx
    from transformers import AutoConfig, AutoTokenizer

    from aloe_jax.models.config import config_from_hf
    from aloe_jax.models.decoder import Decoder
    from aloe_jax.models.weights import export_hf

    ours = config_from_hf(LLAMA31)
    exported = ours.to_hf_dict()
    assert config_from_hf(exported) == ours  # our reader takes back what we write
    assert _rope_as_transformers_4_reads(exported) == (500000.0, LLAMA31["rope_scaling"])
    assert _rope_as_transformers_4_reads(config_from_hf({**LLAMA31, "rope_scaling": None}).to_hf_dict()) == \
        (500000.0, None)

    export_hf(Decoder(ours, nnx.Rngs(0)), smollm2_tokenizer, str(tmp_path / "hf"))
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert _rope_as_transformers_4_reads(written) == (500000.0, LLAMA31["rope_scaling"])
    assert AutoConfig.from_pretrained(tmp_path / "hf").rope_parameters == {**LLAMA31["rope_scaling"],
                                                                           "rope_theta": 500000.0}
    tokenizer_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"  # 4.x has no TokenizersBackend
    assert tokenizer_config["chat_template"] == smollm2_tokenizer.chat_template
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").apply_chat_template(messages, tokenize=False) == \
        smollm2_tokenizer.apply_chat_template(messages, tokenize=False)
    assert pathlib.Path(tmp_path / "hf" / "model.safetensors").exists()
