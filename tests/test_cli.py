"""The CLI: user mistakes are one clear line and a non-zero exit; `chat` matches transformers' greedy generate."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from aloe_jax.models.loader import load_model
from aloe_jax.models.weights import export_hf
from aloe_jax.models.tokenizer import encode_chat


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aloe_jax.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _assert_one_line_error(result: subprocess.CompletedProcess, expected: str):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and expected in lines[0], result.stderr


def test_missing_model_path(tmp_path):
    _assert_one_line_error(run_cli("chat", "hi", "--model", str(tmp_path / "nowhere")), "neither an existing path")


def test_folder_without_config(tmp_path):
    _assert_one_line_error(run_cli("chat", "hi", "--model", str(tmp_path)), "no config.json")


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 10}')
    _assert_one_line_error(run_cli("chat", "hi", "--model", str(tmp_path)), "unsupported model_type 'gpt2'")


def test_truncated_safetensors(tiny_model_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dirs["llama3"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _assert_one_line_error(run_cli("chat", "hi", "--model", str(broken)), "model.safetensors")


def test_bad_flag_value():
    _assert_one_line_error(run_cli("chat", "hi", "--max-tokens", "0"), "model.generation.max_tokens: Input should be greater than 0")


@pytest.fixture(scope="module")
def smollm2_export(tmp_path_factory):
    """The embedded SmolLM2 exported by our code to an HF folder, and the model + tokenizer."""
    model, tokenizer = load_model(None)
    folder = tmp_path_factory.mktemp("smollm2_hf")
    export_hf(model, tokenizer, str(folder))
    return folder, model, tokenizer


PROMPTS = ["What is the capital of France?", "Give me one tip for sleeping better.",
           "I'm a 34-year-old vegan who loves hiking. Suggest a weekend plan."]


def test_smollm2_logits_match_transformers_on_exported_folder(smollm2_export):
    import jax.numpy as jnp
    import numpy as np

    from aloe_jax.models import masks
    from tests.tiny_models import load_torch_model

    folder, model, tokenizer = smollm2_export
    ids, _ = encode_chat(tokenizer, [{"role": "user", "content": PROMPTS[2]}], add_generation_prompt=True)
    with torch.no_grad():
        ref = load_torch_model(folder)(torch.tensor([ids])).logits.numpy()
    valid = jnp.ones((1, len(ids)), bool)
    ours, _ = model(jnp.asarray([ids]), masks.positions_from_valid(valid), masks.causal_mask(valid))
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-3


def test_chat_equals_transformers_greedy_generate(smollm2_export):
    from transformers import AutoTokenizer

    from aloe_jax.sampling.chat import ChatEngine
    from aloe_jax.sampling.sampler import SamplingParams
    from tests.tiny_models import load_torch_model

    folder, model, tokenizer = smollm2_export
    hf_model, hf_tok = load_torch_model(folder), AutoTokenizer.from_pretrained(folder)
    expected = []
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]
        with torch.no_grad():
            out = hf_model.generate(ids, max_new_tokens=24, do_sample=False)
        expected.append(hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    # The command line, end to end, on the first prompt (a subprocess loads the model again: do it once) ...
    result = run_cli("chat", PROMPTS[0], "--max-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected[0]
    # ... and the engine behind it on every prompt, as one batch.
    replies = ChatEngine(model, tokenizer).reply([[{"role": "user", "content": p}] for p in PROMPTS],
                                                 SamplingParams(max_new_tokens=24))
    assert [r.text for r in replies] == expected


@pytest.mark.parametrize("command, device_files, user_choice, expected", [
    ("eval", [], None, "cpu"),  # no accelerator: CPU only, libtpu is never probed
    ("eval", ["/dev/nvidia0"], None, None),  # a GPU host: JAX picks its backend itself
    ("eval", ["/dev/vfio/0"], None, None),  # a TPU VM
    ("compile", [], None, None),  # compile needs the TPU plugin on this CPU
    ("eval", [], "cuda", "cuda"),  # the user's JAX_PLATFORMS wins
])
def test_hosts_without_accelerators_run_jax_on_cpu_only(monkeypatch, command, device_files, user_choice, expected):
    import glob

    from aloe_jax.core import distributed

    monkeypatch.setattr(glob, "glob", lambda pattern: [f for f in device_files if glob.fnmatch.fnmatch(f, pattern)])
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    if user_choice is not None:
        monkeypatch.setenv("JAX_PLATFORMS", user_choice)
    updates = []
    monkeypatch.setattr(sys.modules["jax"].config, "update", lambda *a: updates.append(a))
    distributed.cpu_only_without_accelerators(command)
    assert os.environ.get("JAX_PLATFORMS") == expected
    assert updates == ([("jax_platforms", "cpu")] if expected == "cpu" and user_choice is None else [])
