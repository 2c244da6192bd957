"""`aloe-jax rl` end to end on a tiny word-level model: GRPO learns a rule-based reward (and unlearns it when the
reward is negated), a run killed with SIGKILL during a rollout and during an update resumes to the metrics of an
uninterrupted run, and the finished run folder loads as a model."""

import glob
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from aloe_jax.llm.base import ChatResult
from tests.conftest import SHARED

REPO = pathlib.Path(__file__).resolve().parents[1]
KEYWORD = "tea"
WORDS = ["[UNK]", "user", "assistant", "system", "hello", "number", *"0123456789", KEYWORD, "he", "likes", "birds",
         "and", "a", "is", "good", "day", "it", "we", "you", "me", "to", "of", "in", "on", "go", "now", "yes", "no",
         "why", "how", "what", "run", "sing", "read", "play", "cook", "walk", "fish", "book", "sun", "rain", "blue",
         "red"]
assert sum(KEYWORD in w for w in WORDS) == 1  # the judge matches substrings: only the keyword itself may hit


@pytest.fixture(scope="module")
def word_policy(tmp_path_factory, smollm2_tokenizer) -> str:
    """An HF folder: a tiny random Llama over a 55-token word-level vocabulary with SmolLM2's chat template, so
    that a random policy says the keyword in ~8% of 8-token replies (with a 49k-token vocabulary it almost never
    would, and every update would pay for 49k logits)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    fast.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": "<|im_start|>"})
    fast.chat_template = smollm2_tokenizer.chat_template
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   tie_word_embeddings=False, pad_token_id=fast.pad_token_id,
                                   bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    folder = tmp_path_factory.mktemp("word_policy")
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return str(folder)


class ScriptedUser:
    """A simulated user that says "hello number N" (N = messages so far): the policy's context grows every turn."""

    name = "scripted-user"

    def chat(self, conversations, params):
        return [ChatResult(f"hello number {len(c) % 10}", "stop", 1, 1) for c in conversations]

    def score_options(self, conversations, options):
        return None


def toy_config(policy: str, out, iterations: int, **overrides) -> dict:
    """8 cases × 2 turns × G = 4 candidates of 8 tokens, on the 8 CPU devices (rows over data)."""
    cfg = dict(model={"path": policy, "dtype": "float32"}, output_dir=str(out), iterations=iterations,
               data={"seq_len": 512},
               rollout={"cases": 8, "group_size": 4, "turns": 2, "aloe_data": str(SHARED / "aloe_data"),
                        "generation": {"temperature": 1.0, "max_tokens": 8}},
               simulator={"repeat_threshold": None}, judge={"method": "logprobs"},
               optim={"lr": 3e-3, "schedule": "constant", "warmup_steps": 0}, log={"progress_bar": False})
    cfg.update(overrides)
    return cfg


def keyword_rate(out, iteration: int) -> float:
    """Share of iteration `iteration`'s candidates that say the keyword."""
    trees = [json.loads(line) for line in open(os.path.join(out, "rollouts", f"iter_{iteration:05d}", "trees.jsonl"))]
    texts = [c["text"] for tree in trees for turn in tree["turns"] for c in turn["candidates"]]
    return sum(KEYWORD in text.split() for text in texts) / len(texts)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "logs", "metrics.jsonl"))]


def test_grpo_learns_a_rule_based_reward_and_the_negated_reward_unlearns_it(word_policy, tmp_path):
    """Seed 0, lr 3e-3, k3 KL 0.04. Measured: the keyword's share goes 7.8% → 70% in 20 iterations (mean reward
    1.31 → 3.81) and, negated, 7.8% → 0%."""
    from aloe_jax.rl.config import RLConfig
    from aloe_jax.rl.loop import run
    from aloe_jax.rl.rewards import KeywordJudge

    rates = {}
    for name, judge in (("reward", KeywordJudge(KEYWORD, hit=5, miss=1)),
                        ("negated", KeywordJudge(KEYWORD, hit=1, miss=5))):
        out = tmp_path / name
        run(RLConfig.model_validate(toy_config(word_policy, out, 20)),
            backends={"simulator": ScriptedUser(), "judge": judge}, show_progress=False)
        rates[name] = [keyword_rate(out, i) for i in range(20)]
        if name == "reward":
            logged = metrics(out)
            assert [m["step"] for m in logged] == list(range(1, 21))
            assert logged[-1]["reward/mean"] > logged[0]["reward/mean"] + 1.5
            assert logged[-1]["kl"] > 0 and all(np.isfinite(m["loss"]) for m in logged)
            assert (out / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"
    # Iteration 0 is the same rollout for both (same seed, same starting policy).
    assert rates["reward"][0] == rates["negated"][0] > 0
    assert np.mean(rates["reward"][-3:]) > np.mean(rates["reward"][:3]) + 0.3
    assert np.mean(rates["negated"][-3:]) < 0.5 * np.mean(rates["negated"][:3])


TIMING_KEYS = ("tokens_per_s", "rollout_s", "update_s", "rollout_tokens_per_s", "update_tokens_per_s")


def _comparable(logged: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS and not k.startswith("seconds/")} for m in logged]


def test_sigkill_in_a_rollout_and_in_an_update_then_the_same_command_gives_the_uninterrupted_metrics(
        word_policy, tmp_path):
    """Real SIGKILLs of `aloe-jax rl` (ALOE_JAX_FAULT picks the exact place): in iteration 1's second rollout turn,
    then — after rerunning — in iteration 2's update; the third run of the same command finishes. Its metrics and
    rollouts equal an uninterrupted run's."""
    # One CPU device per process (2 rows), and every compiled program shared through the cache: four processes.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    judge = json.dumps({"kind": "keyword", "model": KEYWORD})
    user = json.dumps({"kind": "jax", "model": word_policy})

    def command(out):
        return [sys.executable, "-m", "aloe_jax.cli", "rl", "--model", word_policy, "--out", str(out),
                "--iterations", "3", "--aloe-data", str(SHARED / "aloe_data"), "model.dtype=float32",
                "data.seq_len=512", "rollout.cases=2", "rollout.turns=2", "rollout.generation.max_tokens=8",
                f"judge.backend={judge}", "judge.method=logprobs", f"simulator.backend={user}",
                "simulator.generation.max_tokens=4", "simulator.repeat_threshold=null", "optim.lr=3e-3",
                "optim.schedule=constant", "optim.warmup_steps=0", "log.progress_bar=false"]

    def run(out, fault=None):
        return subprocess.run(command(out), cwd=REPO, env={**env, **({"ALOE_JAX_FAULT": fault} if fault else {})},
                              capture_output=True, text=True, timeout=600)

    whole = tmp_path / "whole"
    assert run(whole).returncode == 0
    killed = tmp_path / "killed"
    first = run(killed, "rollout:1")
    assert first.returncode == -9, first.stderr[-2000:]
    assert len(metrics(killed)) == 1  # iteration 0 finished, iteration 1 died mid-rollout
    turns = [json.loads(line) for line in open(killed / "rollouts" / "iter_00001" / "turns.jsonl")]
    assert {r["turn"] for r in turns} == {0}  # its first turn committed, the second not
    second = run(killed, "update:2")
    assert second.returncode == -9, second.stderr[-2000:]
    assert "resuming from the checkpoint of step 1" in second.stdout
    third = run(killed)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "resuming from the checkpoint of step 2" in third.stdout
    assert _comparable(metrics(killed)) == _comparable(metrics(whole))
    assert [m["step"] for m in metrics(killed)] == [1, 2, 3]
    for iteration in range(3):
        name = f"rollouts/iter_{iteration:05d}/trees.jsonl"
        assert (killed / name).read_text() == (whole / name).read_text()


def test_the_rl_run_folder_loads_as_a_model_and_the_config_mistakes_are_one_line(word_policy, tmp_path):
    from aloe_jax.cli import main
    from aloe_jax.models.loader import load_model, model_source

    judge = json.dumps({"kind": "keyword", "model": KEYWORD})

    def args(out, seq_len=512, *more):
        return ["rl", "--model", word_policy, "--out", str(out), "--iterations", "1", "--aloe-data",
                str(SHARED / "aloe_data"), "model.dtype=float32", f"data.seq_len={seq_len}", "rollout.turns=1",
                "rollout.generation.max_tokens=4", f"judge.backend={judge}", "judge.method=logprobs",
                f"simulator.backend={json.dumps({'kind': 'jax', 'model': word_policy})}",
                "simulator.generation.max_tokens=4", "simulator.repeat_threshold=null", "log.progress_bar=false",
                *more]

    assert main(args(tmp_path / "run")) == 0
    model, tokenizer = load_model(str(tmp_path / "run"), param_dtype="float32", dtype="float32")
    assert len(tokenizer) == len(WORDS) + 3
    # The base's provenance is recorded when the run starts, and still stated after the base has moved.
    info_path = tmp_path / "run" / "aloe_run.json"
    info = json.loads(info_path.read_text())
    assert info["objective"] == "grpo" and info["base_source"] == {"format": "hf", "dtype": "float32"}
    info_path.write_text(json.dumps({**info, "base_model": str(tmp_path / "moved")}))
    assert model_source(str(tmp_path / "run"))["base_source"] == {"format": "hf", "dtype": "float32"}
    assert main(args(tmp_path / "a", 512, "rollout.cases=3", "micro_batches=2")) == 2  # one line, exit 2
    assert main(args(tmp_path / "b", 16)) == 2  # not one turn fits a row: one line naming data.seq_len
