"""The reward curve of an RL run: `<output_dir>/reward_curve.png`, redrawn after every iteration from the logged
metrics (mean reward of all candidates and of the continued ones, per turn, and the KL to the reference)."""

from __future__ import annotations

import io
from typing import Sequence

from aloe_jax.core import storage


def plot_reward_curve(records: Sequence[dict], path: str, title: str = "aloe-jax rl") -> None:
    """Write a PNG of the per-iteration metrics `records` (the metrics JSONL lines, one per iteration)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = sorted({r["step"]: r for r in records if "reward/mean" in r}.values(), key=lambda r: r["step"])
    if not records:
        return
    steps = [r["step"] for r in records]
    fig, (ax, ax_kl) = plt.subplots(1, 2, figsize=(13, 4.5), dpi=140)
    ax.plot(steps, [r["reward/mean"] for r in records], marker="o", linewidth=2, label="all candidates")
    if all("reward/continued" in r for r in records):
        ax.plot(steps, [r["reward/continued"] for r in records], marker="s", linewidth=1.5,
                label="continued candidate")
    turns = sorted({int(k.rsplit("_", 1)[1]) for r in records for k in r if k.startswith("reward/turn_")})
    for turn in turns:
        name = f"reward/turn_{turn}"
        ax.plot(steps, [r.get(name, float("nan")) for r in records], linestyle=":", linewidth=1, label=f"turn {turn}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean reward")
    ax.set_title(f"{title}: reward per iteration")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    ax_kl.plot(steps, [r.get("kl", float("nan")) for r in records], marker="o", color="tab:red", label="KL (k3)")
    ax_kl.plot(steps, [r.get("clip_fraction", float("nan")) for r in records], marker="^", color="tab:gray",
               label="clip fraction")
    ax_kl.set_xlabel("iteration")
    ax_kl.set_title("policy drift")
    ax_kl.grid(True, alpha=0.3)
    ax_kl.legend(fontsize=9)
    from matplotlib.ticker import MaxNLocator

    for axis in (ax, ax_kl):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    storage.write_bytes(path, buffer.getvalue())
