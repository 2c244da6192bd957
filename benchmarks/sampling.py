"""Decode speed: aloe-jax's batched KV-cache sampler vs transformers' PyTorch `generate`, on SmolLM2-135M-Instruct.

Same weights (ours exported to an HF folder that transformers loads), same chat prompts, greedy, exactly N new tokens
per row (end-of-turn ignored on both sides so every row does the same work), batch 1 and batch 32, on CPU.

Both sides run in fp32 and in bf16 (this CPU has AVX512-BF16, and torch's oneDNN bf16 GEMMs use it): the peer as its
users would run it for speed (`dtype=torch.bfloat16`, SDPA attention, `inference_mode`), ours with bf16 parameters
and activations. The configurations are timed interleaved (one generation of each per repeat, in turn), and the
ratio is taken against the faster peer.

    .venv/bin/python -m benchmarks.sampling [--new-tokens 128] [--batches 1 32] [--repeats 2]
        [--ours float32 bfloat16] [--peer float32 bfloat16]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS = [
    "What is the capital of France?", "Suggest a quick vegan dinner.", "How do I stay focused while studying?",
    "Tell me a fun fact about octopuses.", "I'm a nurse working night shifts. Any tips for sleep?",
    "Explain what a neural network is in two sentences.", "Recommend a hiking trail type for beginners.",
    "What should I pack for a weekend in the mountains?", "How can I learn guitar faster?",
    "Write a short poem about autumn.", "What's a good way to start journaling?",
    "Give me three ideas for a rainy day with kids.",
]
DTYPES = ("float32", "bfloat16")
SHORT = {"float32": "fp32", "bfloat16": "bf16"}


def _prompts(tokenizer, batch: int) -> list[list[int]]:
    from aloe_jax.models.tokenizer import encode_chat

    texts = [PROMPTS[i % len(PROMPTS)] + (" Please be brief." if i >= len(PROMPTS) else "") for i in range(batch)]
    return [encode_chat(tokenizer, [{"role": "user", "content": t}], add_generation_prompt=True)[0] for t in texts]


def aloe_runner(model, tokenizer, prompts, new_tokens: int):
    """(run() -> generated ids, seconds of the first call incl. compilation)."""
    from aloe_jax.sampling.sampler import Sampler, SamplingParams

    sampler = Sampler(model, pad_id=tokenizer.pad_token_id, stop_ids=())  # no stop ids: exactly new_tokens per row
    params = SamplingParams(max_new_tokens=new_tokens)

    def run() -> list[list[int]]:
        return [g.tokens for g in sampler.generate(prompts, params)]

    start = time.perf_counter()
    run()
    return run, time.perf_counter() - start


def load_peer(folder: str, dtype: str):
    """transformers' model as its users run it on CPU for speed: the given dtype, SDPA attention."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    # No eos at all (rather than min_new_tokens, which would *suppress* eos and change the greedy path): both sides
    # then decode exactly the same number of tokens.
    model.generation_config.eos_token_id = None
    return model.eval()


def transformers_runner(model, tokenizer, prompts, new_tokens: int):
    """run() -> generated ids, for transformers' generate with left padding (warmed up)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def run(**extra) -> list[list[int]]:
        with torch.inference_mode():
            return model.generate(ids, **{**kwargs, **extra})[:, width:].tolist()

    run(max_new_tokens=4)  # warm-up
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=2, help="timed generations per configuration (interleaved)")
    parser.add_argument("--ours", nargs="+", choices=DTYPES, default=list(DTYPES), help="aloe-jax dtypes")
    parser.add_argument("--peer", nargs="+", choices=DTYPES, default=list(DTYPES), help="transformers dtypes")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1,
                        help="torch intra-op threads (1 is steadier on a machine shared with other jobs)")
    args = parser.parse_args()

    import jax
    import torch
    import transformers

    from aloe_jax.models.loader import load_model
    from aloe_jax.models.weights import export_hf

    torch.set_num_threads(args.torch_threads)
    ours = {dt: load_model(None, param_dtype=dt, dtype=dt) for dt in args.ours}
    tokenizer = next(iter(ours.values()))[1]
    folder = tempfile.mkdtemp(prefix="smollm2_hf_")
    export_hf(load_model(None)[0], tokenizer, folder)  # fp32 weights; the bf16 peer casts them as it loads
    peers = {dt: load_peer(folder, dt) for dt in args.peer}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__} "
          f"on {jax.devices()[0].platform}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    for dt in args.ours:
        print(f"aloe-jax {SHORT[dt]}: {dt} parameters and activations, left-padded prefill + lax.while_loop decode "
              "over a static KV cache, one jit program per bucket (compile time reported separately)")
    for dt, model in peers.items():
        print(f"transformers {transformers.__version__} + torch {torch.__version__} {SHORT[dt]}: "
              f"from_pretrained(dtype=torch.{dt}, attn_implementation={model.config._attn_implementation!r}), "
              f"generate(do_sample=False) with its dynamic KV cache, inference_mode, {torch.get_num_threads()} "
              f"threads, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{args.repeats} timed generations per configuration, interleaved; tok/s from the fastest (median beside it)")

    table = []
    for batch in args.batches:
        prompts = _prompts(tokenizer, batch)
        runs, compile_s = {}, {}
        for dt, (model, _) in ours.items():
            runs[f"aloe-jax {SHORT[dt]}"], first = aloe_runner(model, tokenizer, prompts, args.new_tokens)
            compile_s[f"aloe-jax {SHORT[dt]}"] = first
        for dt, model in peers.items():
            runs[f"transformers {SHORT[dt]}"] = transformers_runner(model, tokenizer, prompts, args.new_tokens)
        seconds = {name: [] for name in runs}
        ids = {}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                ids[name] = run()
                seconds[name].append(time.perf_counter() - start)
        tokens = batch * args.new_tokens
        rate = {name: tokens / min(s) for name, s in seconds.items()}
        median = {name: tokens / statistics.median(s) for name, s in seconds.items()}
        for name in compile_s:  # the first call's extra time over a steady one is the compilation
            compile_s[name] -= min(seconds[name])
        reference = ids[next(iter(ids))]
        peer_names = [n for n in runs if n.startswith("transformers")]
        faster = max(peer_names, key=rate.get) if peer_names else None
        print(f"\nbatch {batch}:")
        for name in runs:
            same = sum(a == b for a, b in zip(ids[name], reference))
            extra = f" | compile {compile_s[name]:5.1f}s" if name in compile_s else ""
            vs = f" | {rate[name] / rate[faster]:5.2f}x {faster}" if faster and name in compile_s else ""
            print(f"  {name:<17} {rate[name]:8.1f} tok/s (median {median[name]:8.1f}){vs}{extra} | greedy rows "
                  f"identical to {next(iter(ids))}: {same}/{batch}")
            table.append((batch, name, rate[name], median[name], rate[name] / rate[faster] if faster else None,
                          faster, same))

    print("\n| batch | configuration | tok/s (best) | tok/s (median) | vs faster peer | greedy rows = first config |")
    print("|---|---|---|---|---|---|")
    for batch, name, best, med, ratio, faster, same in table:
        vs = f"{ratio:.2f}x ({faster})" if faster and name.startswith("aloe") else ""
        print(f"| {batch} | {name} | {best:.1f} | {med:.1f} | {vs} | {same}/{batch} |")


if __name__ == "__main__":
    from aloe_jax.core.distributed import cpu_only_without_accelerators

    cpu_only_without_accelerators("benchmark")  # as `aloe-jax` does: no libtpu probe warnings on a CPU host
    main()
