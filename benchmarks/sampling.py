"""Decode speed: aloe-jax's batched KV-cache sampler vs transformers' PyTorch `generate`, on SmolLM2-135M-Instruct.

Same weights (ours exported to an HF folder that transformers loads), same chat prompts, greedy, exactly N new tokens
per row (end-of-turn ignored on both sides so every row does the same work), batch 1 and batch 32, fp32 on CPU.

    .venv/bin/python -m benchmarks.sampling [--new-tokens 128] [--batches 1 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import platform
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


def _prompts(tokenizer, batch: int) -> list[list[int]]:
    from aloe_jax.models.tokenizer import encode_chat

    texts = [PROMPTS[i % len(PROMPTS)] + (" Please be brief." if i >= len(PROMPTS) else "") for i in range(batch)]
    return [encode_chat(tokenizer, [{"role": "user", "content": t}], add_generation_prompt=True)[0] for t in texts]


def bench_aloe(model, tokenizer, prompts, new_tokens: int, repeats: int) -> tuple[float, float, list[list[int]]]:
    """(best seconds, first-call seconds incl. compile, generated ids)."""
    from aloe_jax.sampling.sampler import Sampler, SamplingParams

    sampler = Sampler(model, pad_id=tokenizer.pad_token_id, stop_ids=())  # no stop ids: exactly new_tokens per row
    params = SamplingParams(max_new_tokens=new_tokens)
    start = time.perf_counter()
    out = sampler.generate(prompts, params)
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = sampler.generate(prompts, params)
        best = min(best, time.perf_counter() - start)
    return best, first, [g.tokens for g in out]


def bench_transformers(folder, tokenizer, prompts, new_tokens: int, repeats: int):
    """(best seconds, generated ids) for transformers' generate with left padding and its default (SDPA) attention."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    # No eos at all (rather than min_new_tokens, which would *suppress* eos and change the greedy path): both sides
    # then decode exactly the same tokens.
    model.generation_config.eos_token_id = None
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        model.generate(ids, **{**kwargs, "max_new_tokens": 4})  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            best = min(best, time.perf_counter() - start)
    return best, out[:, width:].tolist(), model.config._attn_implementation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import jax

    from aloe_jax.models.loader import load_model
    from aloe_jax.models.weights import export_hf

    model, tokenizer = load_model(None)
    folder = tempfile.mkdtemp(prefix="smollm2_hf_")
    export_hf(model, tokenizer, folder)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__} "
          f"on {jax.devices()[0].platform}")
    print("aloe-jax: fp32, left-padded prefill + lax.while_loop decode over a static KV cache, one jit program per "
          "bucket (compile time reported separately)")
    rows = []
    for batch in args.batches:
        prompts = _prompts(tokenizer, batch)
        ours, first, our_ids = bench_aloe(model, tokenizer, prompts, args.new_tokens, args.repeats)
        theirs, their_ids, attn = bench_transformers(folder, tokenizer, prompts, args.new_tokens, args.repeats)
        tokens = batch * args.new_tokens
        same = sum(a == b for a, b in zip(our_ids, their_ids))
        rows.append((batch, tokens / ours, tokens / theirs, first - ours, same))
        print(f"transformers {__import__('transformers').__version__} + torch {__import__('torch').__version__}: "
              f"fp32, generate(do_sample=False) with its dynamic KV cache, attn_implementation={attn}, "
              f"inference_mode, {__import__('torch').get_num_threads()} threads")
        print(f"batch {batch:>3}: aloe-jax {tokens / ours:8.1f} tok/s | transformers {tokens / theirs:8.1f} tok/s | "
              f"ratio {theirs / ours:5.2f}x | compile {first - ours:5.1f}s | identical greedy rows {same}/{batch}")
    print("\n| batch | aloe-jax tok/s | transformers tok/s | ratio | identical greedy rows |")
    print("|---|---|---|---|---|")
    for batch, a, t, _, same in rows:
        print(f"| {batch} | {a:.1f} | {t:.1f} | {a / t:.2f}x | {same}/{batch} |")


if __name__ == "__main__":
    main()
