"""Memory and time of one SmolLM2 SFT step at 2 × 2,048 tokens: dense attention (`[T, T]` logits per row and head)
vs blockwise attention (+ label log-probs in chunks), each in its own process so that peak RSS is the step's own.

Same weights (the embedded SmolLM2-135M-Instruct, fp32), the same two packed trees filling 2,048 tokens, same
optimizer; every variant runs one warm-up step (compilation) and then `--steps` timed steps. Memory: the process's
peak resident set (ru_maxrss), that minus its RSS before the first step (what the step itself needs), and XLA's own
temporary-buffer size of the compiled step. On this 24 GB machine the dense step at 2 × 2,048 asks for ~35 GB (with
or without remat: XLA:CPU keeps remat from saving memory in the unrolled layer loop; under scan_layers it works) and
is refused; run `--seq 1024` for a same-run time comparison.

    .venv/bin/python -m benchmarks.attention_memory [--steps 2] [--seq 2048] [--variants dense,blockwise]
    .venv/bin/python -m benchmarks.attention_memory --compile-only --seq 1024   # XLA temporaries, no run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = {
    "dense": dict(attention="dense", logits_chunk=0),
    "blockwise": dict(attention="blockwise", attention_block=512, logits_chunk=0),
    "blockwise+chunked-logits": dict(attention="blockwise", attention_block=512, logits_chunk=512),
    "blockwise+chunked+scan": dict(attention="blockwise", attention_block=512, logits_chunk=512, scan_layers=True),
    # With remat the dense step fits this 24 GB machine at 2 x 2048 (without, it asks for ~35 GB): the time compare.
    "dense+remat": dict(attention="dense", logits_chunk=0, remat="full"),
    "blockwise+chunked+remat": dict(attention="blockwise", attention_block=512, logits_chunk=512, remat="full"),
    "blockwise+chunked+scan+remat": dict(attention="blockwise", attention_block=512, logits_chunk=512,
                                         scan_layers=True, remat="full"),
}


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def run_variant(name: str, steps: int, seq: int) -> dict:
    """One variant in this process: {variant, step_s: [...], peak_gib, loss}."""
    import jax

    from aloe_jax.train.inputs.batch import collate
    from aloe_jax.train.inputs.packing import pack_tree
    from aloe_jax.train.inputs.pipeline import DataConfig, global_batch
    from aloe_jax.models import sharding
    from aloe_jax.models.loader import load_model
    from aloe_jax.train.config import OptimConfig, TrainConfig
    from aloe_jax.train.trainer import Trainer, runtime_options
    from benchmarks.train import make_data

    mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
    cfg = TrainConfig(objective="sft", output_dir="unused", model={"dtype": "float32"}, batch_size=2,
                      data=DataConfig(path="unused", seq_len=seq, max_pairs=32),
                      optim=OptimConfig(lr=1e-5, schedule="constant", warmup_steps=0), **VARIANTS[name])
    model, tokenizer = load_model(None, mesh=mesh, options=runtime_options(cfg))
    # Trees long enough to fill the row: ALOE-like 10-turn trees, cut at turn boundaries to `seq`.
    packed = [p for p in (pack_tree(tokenizer, t, seq, rejected_branches=False) for t in make_data(8, 30)) if p]
    packed.sort(key=len, reverse=True)
    trainer = Trainer(cfg, model, mesh, total_steps=steps + 1)
    del model
    state = trainer.init_state()
    batch = global_batch(collate(packed[:2], 2, seq, 32, tokenizer.pad_token_id), mesh)
    base_rss = _rss_gib()
    seconds, loss = [], None
    for step in range(steps + 1):
        start = time.perf_counter()
        state, metrics = trainer.step(state, batch)
        loss = float(jax.device_get(metrics["loss"]))
        if step:
            seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    temp = trainer._compiled.memory_analysis().temp_size_in_bytes / 2**30  # XLA's own buffer accounting
    return dict(variant=name, step_s=seconds, peak_gib=peak, step_peak_gib=peak - base_rss, xla_temp_gib=temp,
                loss=loss, tokens=[len(p) for p in packed[:2]], seq=seq)


def compiled_temporaries(seq: int) -> None:
    """XLA's temporary-buffer size of the SmolLM2 gradient (2 rows x `seq`, fp32) per variant, compiled only (no
    weights, no run): remat's effect in the unrolled layer loop vs under scan_layers."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from aloe_jax.models.attention import TreeMask
    from aloe_jax.models.decoder import Decoder, RuntimeOptions
    from aloe_jax.models.presets import preset_config

    cfg = preset_config("smollm2-135m", param_dtype="float32", dtype="float32")
    ints = jax.ShapeDtypeStruct((2, seq), jnp.int32)
    print(f"XLA temporaries of the SmolLM2 gradient, 2 x {seq} tokens, fp32 (compiled, not run)")
    for name, options in VARIANTS.items():
        graphdef, params = nnx.split(nnx.eval_shape(lambda o=options: Decoder(cfg, nnx.Rngs(0), RuntimeOptions(**o))))

        def loss(p, tokens, segment, prefix):
            model = nnx.merge(graphdef, p)
            hidden, _ = model.hidden_states(tokens, jnp.broadcast_to(jnp.arange(seq), (2, seq)),
                                            TreeMask(segment, prefix))
            return jnp.sum(model.label_logprobs(hidden, tokens))

        compiled = jax.jit(jax.grad(loss)).lower(params, ints, ints, ints).compile()
        print(f"{name:<30} {compiled.memory_analysis().temp_size_in_bytes / 2**30:>8.2f} GiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant and print its JSON
    parser.add_argument("--compile-only", action="store_true", help="only XLA's temporaries of each variant's gradient")
    args = parser.parse_args()
    if args.compile_only:
        compiled_temporaries(args.seq)
        return
    if args.one:
        print(json.dumps(run_variant(args.one, args.steps, args.seq)))
        return
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    results = []
    for name in args.variants.split(","):
        out = subprocess.run([sys.executable, "-m", "benchmarks.attention_memory", "--one", name, "--steps",
                              str(args.steps), "--seq", str(args.seq)], capture_output=True, text=True, env=env)
        if out.returncode:
            last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"{name}: failed (exit {out.returncode}): {last[:300]}")
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    by_name = {r["variant"]: r for r in results}
    print(f"SmolLM2-135M SFT step, 2 rows x {args.seq} tokens, fp32, 1 CPU device, {args.steps} timed steps each")
    print(f"{'variant':<30} {'step s (mean)':>14} {'peak RSS GiB':>13} {'step peak GiB':>14} {'XLA temp GiB':>13} "
          f"{'loss':>9}")
    for r in results:
        mean = sum(r["step_s"]) / len(r["step_s"])
        line = (f"{r['variant']:<30} {mean:>14.2f} {r['peak_gib']:>13.2f} {r['step_peak_gib']:>14.2f} "
                f"{r.get('xla_temp_gib', float('nan')):>13.2f} {r['loss']:>9.5f}")
        base = by_name.get("dense+remat" if "remat" in r["variant"] else "dense")  # same remat, dense attention
        if base and r is not base:
            base_mean = sum(base["step_s"]) / len(base["step_s"])
            line += f"   time x{mean / base_mean:.2f}, step memory x{r['step_peak_gib'] / base['step_peak_gib']:.2f}"
        print(line)
    print(json.dumps(results))


if __name__ == "__main__":
    from aloe_jax.core.distributed import cpu_only_without_accelerators

    cpu_only_without_accelerators("benchmark")  # as `aloe-jax` does: no libtpu probe warnings on a CPU host
    main()
