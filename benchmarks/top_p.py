"""Top-p filtering per decode step: aloe-jax's candidate search (lax.top_k + full-sort fallback) vs a full sort of
the vocabulary (what the sampler did before, and what a plain implementation does), same logits, same run.

    python -m benchmarks.top_p [--batch 104] [--vocab 49152]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from aloe_jax.sampling import sampler


def _seconds(fn, logits, repeats: int = 5) -> float:
    jax.block_until_ready(fn(logits))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(logits))
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=104)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--top-p", type=float, default=0.9)
    args = parser.parse_args()
    for spread, case in ((5.0, "peaked (nucleus within the 1,024 candidates)"), (3.0, "flat (nucleus past them: fallback)")):
        _compare(args, spread, case)


def _compare(args, spread: float, case: str) -> None:
    logits = jnp.asarray(np.random.RandomState(0).randn(args.batch, args.vocab).astype(np.float32) * spread)
    mode = sampler._Mode(greedy=False, top_k=0, nucleus=True, logprobs=-1)
    top_p = jnp.float32(args.top_p)
    ours = jax.jit(lambda x: sampler._filter_logits(x, top_p, mode))
    full_sort = jax.jit(lambda x: jnp.where(
        x >= sampler._nucleus_threshold(-jnp.sort(-x, axis=-1), jax.nn.logsumexp(x, axis=-1), top_p)[0][:, None],
        x, -jnp.inf))
    assert np.array_equal(np.isfinite(ours(logits)), np.isfinite(full_sort(logits)))
    a, b = _seconds(ours, logits), _seconds(full_sort, logits)
    print(f"{case}: top-p {args.top_p} over [{args.batch}, {args.vocab}] logits, per step: aloe-jax {a * 1e3:.1f} ms, "
          f"full sort {b * 1e3:.1f} ms — {b / a:.1f}x")


if __name__ == "__main__":
    from aloe_jax.core.distributed import cpu_only_without_accelerators

    cpu_only_without_accelerators("benchmark")  # as `aloe-jax` does: no libtpu probe warnings on a CPU host
    main()
