"""Training speed: aloe-jax's SFT and DPO steps vs TRL's SFTTrainer and DPOTrainer (PyTorch), on SmolLM2-135M-Instruct.

Same weights (ours exported to an HF folder that TRL loads), same conversations, same rows or pairs per optimizer
step, AdamW at lr 1e-5, DPO sigmoid loss with ALOE's β 0.9.

Precision: this CPU has AVX512-BF16, which torch's oneDNN GEMMs use, so each side runs in fp32 and in bf16 and the
ratio is against the faster TRL configuration. Ours: fp32 parameters, activations fp32 or bf16 (`--ours`). TRL
(`--peer`): `fp32`; `bf16-amp`, TRL's `bf16=True` (fp32 weights and optimizer, autocast to bf16: what its docs
recommend); `bf16`, the model loaded with `dtype=torch.bfloat16` and `bf16=True` (weights, gradients and AdamW state
in bf16 — faster, less exact).

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
        [--ours float32 bfloat16] [--peer fp32 bf16-amp bf16] [--trl-sft-padding padded padding-free]
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
OURS = ("float32", "bfloat16")
PEERS = ("fp32", "bf16-amp", "bf16")
SHORT = {"float32": "fp32", "bfloat16": "bf16"}


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


def _peer_model(folder: str, peer: str):
    """The HF model as the TRL configuration `peer` loads it."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if peer == "bf16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")


def describe_peer(peer: str) -> str:
    return {"fp32": "fp32 weights and compute",
            "bf16-amp": "bf16=True: fp32 weights/AdamW, autocast bf16 compute",
            "bf16": "dtype=torch.bfloat16 + bf16=True: bf16 weights, gradients, AdamW state"}[peer]


def _trl_args(config_cls, out: str, steps: int, rows: int, accumulation: int, peer: str, **extra):
    return config_cls(output_dir=out, max_steps=steps, per_device_train_batch_size=rows,
                      gradient_accumulation_steps=accumulation, learning_rate=LR, lr_scheduler_type="constant",
                      warmup_steps=0, max_length=None, use_cpu=True, bf16=peer != "fp32", report_to="none",
                      save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                      train_sampling_strategy="sequential", dataloader_num_workers=0, **extra)


def bench_trl_sft(folder: str, tokenizer, trees, rows: int, steps: int, peer: str, padding_free: bool):
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from aloe_jax.models.tokenizer import encode_chat

    torch.manual_seed(0)
    examples = []
    for tree in trees[:(steps + 1) * rows]:
        ids, mask = encode_chat(tokenizer, tree.spine())
        examples.append({"input_ids": ids, "assistant_masks": mask})
    with tempfile.TemporaryDirectory() as out:
        trainer = _step_clock(SFTTrainer)(
            model=_peer_model(folder, peer),
            args=_trl_args(SFTConfig, out, steps + 1, rows, 1, peer, padding_free=padding_free),
            train_dataset=Dataset.from_list(examples), processing_class=AutoTokenizer.from_pretrained(folder))
        trainer.train()
    return _per_step(trainer, 1)


def bench_trl_dpo(folder: str, trees, pairs_per_step: int, micro: int, steps: int, peer: str):
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    examples = [{"prompt": tree.history(k), "chosen": [{"role": "assistant", "content": turn.preferred}],
                 "rejected": [{"role": "assistant", "content": turn.rejected}]}
                for tree in trees for k, turn in enumerate(tree.turns)][:(steps + 1) * pairs_per_step]
    if pairs_per_step % micro:
        raise SystemExit(f"--trl-dpo-micro {micro} must divide the {pairs_per_step} pairs of a step")
    with tempfile.TemporaryDirectory() as out:
        trainer = _step_clock(DPOTrainer)(
            model=_peer_model(folder, peer),
            args=_trl_args(DPOConfig, out, steps + 1, micro, pairs_per_step // micro, peer, beta=BETA,
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
    parser.add_argument("--ours", nargs="+", choices=OURS, default=list(OURS), help="our compute dtypes")
    parser.add_argument("--peer", nargs="+", choices=PEERS, default=list(PEERS), help="TRL precision settings")
    parser.add_argument("--trl-sft-padding", nargs="+", choices=("padded", "padding-free"),
                        default=["padded", "padding-free"], help="TRL SFT batching settings to run")
    parser.add_argument("--only", choices=("sft", "dpo"))
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1,
                        help="torch intra-op threads (1 is steadier on a machine shared with other jobs)")
    args = parser.parse_args()

    import jax
    import torch

    from aloe_jax.models.loader import load_model
    from aloe_jax.models.weights import export_hf

    torch.set_num_threads(args.torch_threads)
    model, tokenizer = load_model(None)
    folder = tempfile.mkdtemp(prefix="smollm2_hf_")
    export_hf(model, tokenizer, folder)
    del model
    import transformers
    import trl

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__} "
          f"({jax.devices()[0].device_kind}), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}), "
          f"transformers {transformers.__version__}, trl {trl.__version__}")
    print(f"SmolLM2-135M-Instruct; AdamW lr {LR}; {TURNS}-turn synthetic trees; {args.steps} timed steps after 1 "
          "warm-up per configuration, configurations back to back in this run")
    for dt in args.ours:
        print(f"  aloe-jax {SHORT[dt]}: fp32 parameters and AdamW, {dt} activations")
    for peer in args.peer:
        print(f"  TRL {peer}: {describe_peer(peer)}, attn_implementation='sdpa'")
    summary = []

    def compare(title: str, unit: str, ours: dict, peers: dict) -> None:
        faster = max(peers, key=lambda name: peers[name])
        for name, rate in ours.items():
            ratio = rate / peers[faster]
            print(f"  ratio {name} / {faster} (the faster peer): {ratio:.2f}x")
            summary.append(f"{title} {name} {rate:.2f} {unit} = {ratio:.2f}x {faster}")

    if args.only in (None, "sft"):
        trees = make_data((args.steps + 1) * args.sft_rows, TURNS)
        print(f"\nSFT, {args.sft_rows} conversations per step")
        ours = {}
        for dt in args.ours:
            ours_s, ours_tok, seq_len = bench_aloe("sft", trees, args.sft_rows, args.steps, dt)
            rate, step = _rate(ours_s, ours_tok)
            ours[f"aloe-jax {SHORT[dt]}"] = rate
            print(f"  aloe-jax {SHORT[dt]:<17}: {rate:8.1f} tokens/s  ({step:.1f} s/step; rows padded to {seq_len}, "
                  f"{sum(ours_tok) // len(ours_tok)} real tokens/step)")
        peers = {}
        for peer in args.peer:
            for padding in args.trl_sft_padding:
                trl_s, trl_tok = bench_trl_sft(folder, tokenizer, trees, args.sft_rows, args.steps, peer,
                                               padding == "padding-free")
                rate, step = _rate(trl_s, trl_tok)
                peers[f"TRL {peer} {padding}"] = rate
                print(f"  {'TRL ' + peer + ' ' + padding:<26}: {rate:8.1f} tokens/s  ({step:.1f} s/step; "
                      f"{sum(trl_tok) // len(trl_tok)} real tokens/step)")
        compare("SFT", "tokens/s", ours, peers)

    if args.only in (None, "dpo"):
        trees = make_data((args.steps + 1) * args.dpo_trees, TURNS)
        pairs = args.dpo_trees * TURNS
        print(f"\nDPO, {pairs} pairs per step ({args.dpo_trees} tree(s) x {TURNS} turns)")
        ours, ours_tokens = {}, 1
        for dt in args.ours:
            ours_s, ours_tok, seq_len = bench_aloe("dpo", trees, args.dpo_trees, args.steps, dt)
            rate, step = _rate(ours_s, float(pairs))
            ours[f"aloe-jax {SHORT[dt]}"], ours_tokens = rate, max(sum(ours_tok), 1)
            print(f"  aloe-jax {SHORT[dt]} (tree-packed): {rate:6.2f} pairs/s  ({step:.1f} s/step; "
                  f"{sum(ours_tok) // len(ours_tok)} real tokens/step, rows padded to {seq_len})")
        peers = {}
        for peer in args.peer:
            trl_s, trl_tok = bench_trl_dpo(folder, trees, pairs, args.trl_dpo_micro, args.steps, peer)
            rate, step = _rate(trl_s, float(pairs))
            peers[f"TRL {peer}"] = rate
            print(f"  TRL {peer:<8} (per pair)   : {rate:6.2f} pairs/s  ({step:.1f} s/step; "
                  f"{sum(trl_tok) // len(trl_tok)} real tokens/step, {args.trl_dpo_micro} examples per forward; "
                  f"{sum(trl_tok) / ours_tokens:.1f}x our tokens)")
        compare("DPO", "pairs/s", ours, peers)

    print("\nsummary: " + "; ".join(summary))


if __name__ == "__main__":
    from aloe_jax.core.distributed import cpu_only_without_accelerators

    cpu_only_without_accelerators("benchmark")  # as `aloe-jax` does: no libtpu probe warnings on a CPU host
    main()
