"""Serving throughput: `aloe-jax serve` (continuous batching) under 1, 8 and 32 concurrent streaming clients, against
transformers' `generate` behind a minimal request loop (one request at a time: the floor a hand-rolled server gives).

Same chat prompts, greedy, mixed reply budgets. The server runs in its own process, started as users start it; the
clients are threads with the official `openai` client (stream=True, so time-to-first-token is measured). The peer
runs in fp32 and bf16 (this CPU has AMX/AVX512-BF16; torch's bf16 GEMMs use it) with SDPA attention, and ratios are
against the faster of the two.

    .venv/bin/python -m benchmarks.serving [--clients 1 8 32] [--requests-per-client 4] [--max-batch 32]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.sampling import PROMPTS, SHORT, load_peer

BUDGETS = (16, 32, 48, 64)


def _requests(n: int) -> list[tuple[str, int]]:
    return [(PROMPTS[i % len(PROMPTS)], BUDGETS[i % len(BUDGETS)]) for i in range(n)]


def start_server(max_batch: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "aloe_jax.cli", "serve", "--port", "0", "--served-name", "smol",
           "--max-batch", str(max_batch), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if " on http://" not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, line.split(" on ")[1].split(" ")[0]


def one_request(client, prompt: str, budget: int) -> tuple[float, float, int]:
    """(seconds to first token, total seconds, completion tokens) of one streamed greedy request."""
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=budget, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - start
    return (first if first is not None else total), total, tokens


def measure_server(base_url: str, clients: int, per_client: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    work = _requests(clients * per_client)

    def run_client(c: int):
        return [one_request(client, *work[c * per_client + i]) for i in range(per_client)]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(run_client, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    return dict(requests_s=len(results) / wall, tokens_s=sum(r[2] for r in results) / wall,
                ttft_p50=statistics.median(ttft), ttft_p95=ttft[int(0.95 * (len(ttft) - 1))], wall=wall)


def measure_peer(model, tokenizer, n: int) -> dict:
    """The minimal loop: each request tokenized with the chat template and generated alone, one after another."""
    import torch

    from aloe_jax.models.tokenizer import encode_chat

    tokens, start = 0, time.perf_counter()
    for prompt, budget in _requests(n):
        ids = torch.tensor([encode_chat(tokenizer, [{"role": "user", "content": prompt}],
                                        add_generation_prompt=True)[0]])
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=budget, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - start
    return dict(requests_s=n / wall, tokens_s=tokens / wall, wall=wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--peer", nargs="+", choices=SHORT, default=list(SHORT), help="transformers dtypes")
    parser.add_argument("--peer-requests", type=int, default=16)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (on a shared machine 1: spinning worker threads collapse under load)")
    args = parser.parse_args()

    import torch
    import transformers

    from aloe_jax.models.loader import load_model
    from aloe_jax.models.weights import export_hf

    torch.set_num_threads(args.torch_threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"aloe-jax: `aloe-jax serve --max-batch {args.max_batch}` (SmolLM2-135M fp32, continuous batching), "
          "clients: openai streaming, greedy, budgets " + "/".join(map(str, BUDGETS)))
    proc, base_url = start_server(args.max_batch)
    rows = []

    def report(name: str, r: dict) -> None:
        rows.append((name, r))
        ttft = f", TTFT p50 {r['ttft_p50']:.2f} s p95 {r['ttft_p95']:.2f} s" if "ttft_p50" in r else ""
        print(f"{name}: {r['requests_s']:.2f} requests/s, {r['tokens_s']:.1f} tokens/s{ttft}", flush=True)

    try:
        for clients in args.clients:  # warm-up: every shape this concurrency needs gets compiled once
            measure_server(base_url, clients, 1)
        for clients in args.clients:
            report(f"aloe-jax, {clients} clients", measure_server(base_url, clients, args.requests_per_client))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    model, tokenizer = load_model(None)
    folder = tempfile.mkdtemp(prefix="smollm2_hf_")
    export_hf(model, tokenizer, folder)
    peers = {}
    for dt in args.peer:
        peer = load_peer(folder, dt)
        peer.generation_config.eos_token_id = tokenizer.eos_token_id  # a server stops at end of turn
        measure_peer(peer, tokenizer, 2)  # warm-up
        peers[dt] = measure_peer(peer, tokenizer, args.peer_requests)
        print(f"transformers {transformers.__version__} + torch {torch.__version__} {SHORT[dt]}: "
              f"from_pretrained(dtype=torch.{dt}, attn_implementation={peer.config._attn_implementation!r}), "
              f"generate(do_sample=False) one request at a time, {torch.get_num_threads()} threads", flush=True)
        report(f"transformers {SHORT[dt]} loop", peers[dt])
    best = max(peers.values(), key=lambda r: r["tokens_s"])
    print(f"\n| server | requests/s | tokens/s | TTFT p50 s | TTFT p95 s | tokens/s vs faster peer |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        ttft = (f"{r['ttft_p50']:.2f} | {r['ttft_p95']:.2f}") if "ttft_p50" in r else "– | –"
        print(f"| {name} | {r['requests_s']:.2f} | {r['tokens_s']:.1f} | {ttft} | {r['tokens_s'] / best['tokens_s']:.2f}× |")


if __name__ == "__main__":
    from aloe_jax.core.distributed import cpu_only_without_accelerators

    cpu_only_without_accelerators("benchmark")  # as `aloe-jax` does: no libtpu probe warnings on a CPU host
    main()
