"""Compile every TPU run config (`configs/runs/*-v5p-{8,64}.yaml`) for its slice with `aloe-jax compile` and write
one JSON per config to benchmarks/results/tpu_compile/, then print the README's table from them.

These are the XLA TPU compiler's figures for the real programs (per-chip bytes from `memory_analysis`, model FLOPs
for the roofline), on a machine without a TPU: an upper bound on speed, not a measured TPU run. Each 7–8B config
takes ~2–4 min to compile on 2 CPU cores (layers under lax.scan).

    .venv/bin/python -m benchmarks.tpu_compile            # compile what is missing, then print the table
    .venv/bin/python -m benchmarks.tpu_compile --table    # only print the table from the saved JSON
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "tpu_compile"
SLICES = ("v5p-8", "v5p-64")


def run_configs() -> list[pathlib.Path]:
    """The TPU run configs."""
    return [p for p in sorted((ROOT / "configs" / "runs").glob("*.yaml")) if p.stem.endswith(SLICES)]


def compile_missing(force: bool = False) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for config in run_configs():
        out = RESULTS / f"{config.stem}.json"
        if out.exists() and not force:
            continue
        topology = next(s for s in SLICES if config.stem.endswith(s))
        proc = subprocess.run([sys.executable, "-m", "aloe_jax.cli", "compile", "--config",
                               str(config.relative_to(ROOT)), "--topology", topology, "--json"],
                              cwd=ROOT, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if not lines:
            print(f"{config.name}: no result (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            continue
        out.write_text("\n".join(lines) + "\n")
        print(f"{config.name}: exit {proc.returncode}", flush=True)


def table() -> str:
    """The markdown table of every saved result."""
    rows = ["| run config | slice (chips) | peak / HBM per chip | free | compile | roofline tokens/s/chip | fits |",
            "|---|---|---:|---:|---:|---:|---|"]
    for path in sorted(RESULTS.glob("*.json")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            free = f"{100 * r['free_fraction']:.0f}%" if r.get("free_fraction") is not None else "—"
            rows.append(f"| `{path.stem}` ({r['program']}) | {r['topology']} ({r['chips']}) | "
                        f"{r['peak_gib']:.1f} / {r['hbm_gib']:.1f} GiB | {free} | {r['compile_s']:.0f} s | "
                        f"{r.get('roofline_tokens_per_s_per_chip', 0):,.0f} | {'yes' if r['fits'] else '**no**'} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="only print the table of the saved results")
    parser.add_argument("--force", action="store_true", help="recompile configs that already have a result")
    args = parser.parse_args()
    if not args.table:
        compile_missing(args.force)
    print(table())


if __name__ == "__main__":
    main()
