"""Training speed: aloe-jax's SFT and DPO steps vs TRL's SFTTrainer and DPOTrainer (PyTorch), on SmolLM2-135M-Instruct.

Same weights (ours exported to an HF folder that TRL loads), same conversations, same rows or pairs per optimizer
step, AdamW at lr 1e-5, DPO sigmoid loss with ALOE's β 0.9, fp32 on both sides (the fastest setting on a CPU without
bf16 units; pass --dtype bfloat16 on hardware that has them).

Data: synthetic 10-turn trees with ALOE-like lengths (benchmarks/packing.make_trees), every turn continued with the
preferred reply, so a tree's preferred path is exactly the conversation TRL's SFT trains on.

* SFT, tokens/s. A step trains on `--sft-rows` conversations. Ours: one packed row per conversation (SFT packs no
  rejected branch), padded to a fixed seq_len. TRL: the same token ids and assistant mask (a pre-tokenized dataset),
  padded per batch (its default) and padding-free (`padding_free=True`); the faster TRL setting is the one compared.
* DPO, pairs/s. A step trains on all pairs of `--dpo-trees` trees. Ours: one tree-packed row per tree, reference
  log-probs in the same step. TRL: one (history, chosen, rejected) example per turn, `--trl-dpo-micro` examples per
  forward with gradient accumulation up to the same pairs per step, reference forward per batch (its default).
  This is also the tree-packed vs naive comparison: TRL scores every pair as two full sequences.

Both sides read the data in order (TRL: train_sampling_strategy="sequential"; consecutive turns have similar lengths,
so this is also length-grouped). Times are steady state: the mean step after one warm-up step (ours: compilation;
TRL: first-step allocations), and the printout gives the tokens each side actually pushed through the model.

    .venv/bin/python -m benchmarks.train [--sft-rows 2] [--dpo-trees 1] [--steps 2] [--only sft|dpo]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TURNS = 10
LR = 1e-5
BETA = 0.9
BUCKET = 128  # our fixed seq_len: the longest row rounded up to this


def make_data(count: int, turns: int = TURNS):
    """`count` trees whose every turn continued with the preferred reply."""
    from benchmarks.packing import make_trees

    trees = make_trees(count, turns)
    for tree in trees:
        for turn in tree.turns:
            turn.continued = "preferred"
    return trees


# --------------------------------------------------------------------------------------------------------- aloe-jax
def bench_aloe(objective: str, trees, rows: int, steps: int, dtype: str) -> tuple[list[float], list[int], int]:
    """(seconds of each step after the first, real tokens of those steps, seq_len) of our trainer."""
    import jax

    from aloe_jax.train.inputs.batch import collate
    from aloe_jax.train.inputs.packing import pack_tree
    from aloe_jax.train.inputs.pipeline import DataConfig
    from aloe_jax.models import sharding
    from aloe_jax.models.loader import load_model
    from aloe_jax.train.config import DPOConfig, OptimConfig, TrainConfig
    from aloe_jax.train.objectives import OBJECTIVES
    from aloe_jax.train.trainer import Trainer

    mesh = sharding.make_mesh()
    model, tokenizer = load_model(None, param_dtype="float32", dtype=dtype, mesh=mesh)
    packed = [pack_tree(tokenizer, t, 1 << 16, rejected_branches=OBJECTIVES[objective].rejected_branches)
              for t in trees]
    seq_len = -(-max(len(p) for p in packed) // BUCKET) * BUCKET
    cfg = TrainConfig(objective=objective, output_dir="unused", model={"dtype": dtype}, batch_size=rows,
                      data=DataConfig(path="unused", seq_len=seq_len, max_pairs=TURNS),
                      optim=OptimConfig(lr=LR, schedule="constant", warmup_steps=0), dpo=DPOConfig(beta=BETA))
    trainer = Trainer(cfg, model, mesh, total_steps=steps + 1)
    del model
    state = trainer.init_state()
    seconds, tokens = [], []
    for step in range(steps + 1):
        rows_packed = packed[step * rows:(step + 1) * rows]
        batch = trainer.device_batch(collate(rows_packed, rows, seq_len, TURNS, tokenizer.pad_token_id))
        start = time.perf_counter()
        state, metrics = trainer.step(state, batch)
        jax.block_until_ready(metrics)
        if step:  # the first step compiles
            seconds.append(time.perf_counter() - start)
            tokens.append(sum(len(p) for p in rows_packed))
    return seconds, tokens, seq_len


# -------------------------------------------------------------------------------------------------------------- TRL
def _step_clock(trainer_cls):
    """`trainer_cls` that records the real tokens each micro-batch carries and the time each optimizer step ends."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    class Clocked(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.clock, self.micro_tokens = Clock(), []
            self.add_callback(self.clock)

        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")
            ids = inputs.get("input_ids")
            self.micro_tokens.append(int(mask.sum()) if mask is not None else int(ids.numel()))
            return super().training_step(model, inputs, *args, **kwargs)

    return Clocked


def _per_step(trainer, micro_per_step: int) -> tuple[list[float], list[int]]:
    """(seconds of each optimizer step after the first, real tokens of those steps)."""
    ends, micro = trainer.clock.ends, trainer.micro_tokens
    seconds = [b - a for a, b in zip(ends[1:], ends[2:])]
    tokens = [sum(micro[i * micro_per_step:(i + 1) * micro_per_step]) for i in range(1, len(ends) - 1)]
    return seconds, tokens


def _trl_args(config_cls, out: str, steps: int, rows: int, accumulation: int, dtype: str, **extra):
    return config_cls(output_dir=out, max_steps=steps, per_device_train_batch_size=rows,
                      gradient_accumulation_steps=accumulation, learning_rate=LR, lr_scheduler_type="constant",
                      warmup_steps=0, max_length=None, use_cpu=True, bf16=dtype == "bfloat16", report_to="none",
                      save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                      train_sampling_strategy="sequential", dataloader_num_workers=0, **extra)


def bench_trl_sft(folder: str, tokenizer, trees, rows: int, steps: int, dtype: str, padding_free: bool):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from aloe_jax.models.tokenizer import encode_chat

    torch.manual_seed(0)
    examples = []
    for tree in trees[:(steps + 1) * rows]:
        ids, mask = encode_chat(tokenizer, tree.spine())
        examples.append({"input_ids": ids, "assistant_masks": mask})
    with tempfile.TemporaryDirectory() as out:
        trainer = _step_clock(SFTTrainer)(
            model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
            args=_trl_args(SFTConfig, out, steps + 1, rows, 1, dtype, padding_free=padding_free),
            train_dataset=Dataset.from_list(examples), processing_class=AutoTokenizer.from_pretrained(folder))
        trainer.train()
    return _per_step(trainer, 1)


def bench_trl_dpo(folder: str, trees, pairs_per_step: int, micro: int, steps: int, dtype: str):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    examples = [{"prompt": tree.history(k), "chosen": [{"role": "assistant", "content": turn.preferred}],
                 "rejected": [{"role": "assistant", "content": turn.rejected}]}
                for tree in trees for k, turn in enumerate(tree.turns)][:(steps + 1) * pairs_per_step]
    if pairs_per_step % micro:
        raise SystemExit(f"--trl-dpo-micro {micro} must divide the {pairs_per_step} pairs of a step")
    with tempfile.TemporaryDirectory() as out:
        trainer = _step_clock(DPOTrainer)(
            model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
            args=_trl_args(DPOConfig, out, steps + 1, micro, pairs_per_step // micro, dtype, beta=BETA,
                           loss_type=["sigmoid"]),
            train_dataset=Dataset.from_list(examples), processing_class=AutoTokenizer.from_pretrained(folder))
        trainer.train()
    return _per_step(trainer, pairs_per_step // micro)


# ------------------------------------------------------------------------------------------------------------- main
def _rate(seconds: list[float], amount: list[int] | float) -> tuple[float, float]:
    """(units per second, mean seconds per step) over the timed steps."""
    total = sum(amount) if isinstance(amount, list) else amount * len(seconds)
    return total / sum(seconds), sum(seconds) / len(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft-rows", type=int, default=2, help="conversations per SFT step")
    parser.add_argument("--dpo-trees", type=int, default=1, help="10-turn trees (10 pairs each) per DPO step")
    parser.add_argument("--trl-dpo-micro", type=int, default=2, help="TRL DPO examples per forward pass")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--only", choices=("sft", "dpo"))
    args = parser.parse_args()

    import jax
    import torch

    from aloe_jax.models.loader import load_model
    from aloe_jax.models.weights import export_hf

    torch.set_num_threads(os.cpu_count() or 1)
    model, tokenizer = load_model(None)
    folder = tempfile.mkdtemp(prefix="smollm2_hf_")
    export_hf(model, tokenizer, folder)
    del model
    import transformers
    import trl

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__} "
          f"({jax.devices()[0].device_kind}), torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, trl {trl.__version__}")
    print(f"SmolLM2-135M-Instruct, {args.dtype}; AdamW lr {LR}; {TURNS}-turn synthetic trees; "
          f"{args.steps} timed steps after 1 warm-up per configuration")
    results = []

    if args.only in (None, "sft"):
        trees = make_data((args.steps + 1) * args.sft_rows, TURNS)
        ours_s, ours_tok, seq_len = bench_aloe("sft", trees, args.sft_rows, args.steps, args.dtype)
        ours_rate, ours_step = _rate(ours_s, ours_tok)
        print(f"\nSFT, {args.sft_rows} conversations per step")
        print(f"  aloe-jax      : {ours_rate:8.1f} tokens/s  ({ours_step:.1f} s/step; rows padded to {seq_len}, "
              f"{sum(ours_tok) // len(ours_tok)} real tokens/step)")
        best = None
        for padding_free in (False, True):
            trl_s, trl_tok = bench_trl_sft(folder, tokenizer, trees, args.sft_rows, args.steps, args.dtype,
                                           padding_free)
            rate, step = _rate(trl_s, trl_tok)
            name = "padding-free" if padding_free else "padded"
            print(f"  TRL {name:<12}: {rate:8.1f} tokens/s  ({step:.1f} s/step; "
                  f"{sum(trl_tok) // len(trl_tok)} real tokens/step)")
            best = max(best or (0, ""), (rate, name))
        ratio = ours_rate / best[0]
        print(f"  ratio aloe-jax / TRL ({best[1]}): {ratio:.2f}x  (goal >= 1.5x: {'met' if ratio >= 1.5 else 'MISSED'})")
        results.append(("SFT tokens/s", ratio))

    if args.only in (None, "dpo"):
        trees = make_data((args.steps + 1) * args.dpo_trees, TURNS)
        pairs = args.dpo_trees * TURNS
        ours_s, ours_tok, seq_len = bench_aloe("dpo", trees, args.dpo_trees, args.steps, args.dtype)
        ours_rate, ours_step = _rate(ours_s, float(pairs))
        print(f"\nDPO, {pairs} pairs per step ({args.dpo_trees} tree(s) x {TURNS} turns)")
        print(f"  aloe-jax (tree-packed): {ours_rate:6.2f} pairs/s  ({ours_step:.1f} s/step; "
              f"{sum(ours_tok) // len(ours_tok)} real tokens/step, rows padded to {seq_len})")
        trl_s, trl_tok = bench_trl_dpo(folder, trees, pairs, args.trl_dpo_micro, args.steps, args.dtype)
        trl_rate, trl_step = _rate(trl_s, float(pairs))
        print(f"  TRL (per pair)        : {trl_rate:6.2f} pairs/s  ({trl_step:.1f} s/step; "
              f"{sum(trl_tok) // len(trl_tok)} real tokens/step, {args.trl_dpo_micro} examples per forward)")
        ratio = ours_rate / trl_rate
        print(f"  ratio aloe-jax / TRL: {ratio:.2f}x  (goal >= 1.5x vs TRL: {'met' if ratio >= 1.5 else 'MISSED'}; "
              f"tree-packed vs naive >= 3x: {'met' if ratio >= 3 else 'MISSED'}); tokens per step "
              f"{sum(trl_tok) / max(sum(ours_tok), 1):.1f}x fewer")
        results.append(("DPO pairs/s", ratio))

    print("\nsummary: " + ", ".join(f"{name} {ratio:.2f}x TRL" for name, ratio in results))


if __name__ == "__main__":
    main()
