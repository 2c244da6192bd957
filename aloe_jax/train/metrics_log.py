"""Training metrics: a JSONL file (one line per logged step, and one per hook result such as eval/loss; appended and
flushed so a crash loses nothing), TensorBoard event files (tensorboardX, no TensorFlow needed), optionally a Weights &
Biases run (`log.wandb`) with the same metrics, and a tqdm progress bar with loss, tokens/s and estimated MFU.

Only process 0 writes. For a gs:// run folder the files are written to a local mirror and uploaded by `sync()`
(called at every checkpoint), because neither appends nor event files can be streamed to Cloud Storage objects.
The W&B run's id is kept in the run folder, so that resuming the run folder continues the same W&B run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import TYPE_CHECKING

import jax

from aloe_jax.core import storage
from aloe_jax.core.errors import ConfigError

if TYPE_CHECKING:
    from aloe_jax.train.config import WandbConfig

LOG_DIR = "logs"
METRICS_FILE = "metrics.jsonl"
WANDB_RUN_ID_FILE = "wandb_run_id"  # the W&B run that a resume of this run folder continues

# Dense bf16 peak FLOP/s per device, by the start of `jax.Device.device_kind`. Longest prefixes are tried first.
PEAK_FLOPS_BY_DEVICE_KIND = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops_per_device(override: float | None = None) -> float | None:
    """Peak FLOP/s of one local device: `override`, else the table entry for its kind, else None (e.g. CPU)."""
    if override:
        return override
    return peak_flops_of_kind(jax.devices()[0].device_kind)


def peak_flops_of_kind(kind: str) -> float | None:
    """Peak FLOP/s of a device of this `device_kind` (e.g. "TPU v5 lite"), or None when it is not in the table."""
    for prefix in sorted(PEAK_FLOPS_BY_DEVICE_KIND, key=len, reverse=True):
        if kind.startswith(prefix):
            return PEAK_FLOPS_BY_DEVICE_KIND[prefix]
    return None


def import_wandb():
    """The `wandb` module, imported only when a run asks for it; a one-line error when it is not installed."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("log.wandb is set but wandb is not installed: pip install 'aloe-jax[wandb]' "
                          "(or remove log.wandb)") from None
    return wandb


class MetricsLogger:
    """Writes each logged step's metrics to JSONL, TensorBoard and W&B (when `wandb` is set, with `run_config` as the
    W&B run's config) and shows progress (process 0 only)."""

    def __init__(self, output_dir: str, total_steps: int, start_step: int, flops_per_token: float,
                 peak_flops: float | None, progress_bar: bool = True, wandb: WandbConfig | None = None,
                 run_config: dict | None = None):
        self.enabled = jax.process_index() == 0
        self.remote = storage.join(output_dir, LOG_DIR) if storage.is_gcs(output_dir) else None
        if self.remote:
            digest = hashlib.sha256(self.remote.encode()).hexdigest()[:16]
            self.log_dir = str(storage.cache_dir() / "runs" / digest / LOG_DIR)
        else:
            self.log_dir = os.path.join(output_dir, LOG_DIR)
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops * jax.device_count() if peak_flops else None
        self._last_time = time.perf_counter()
        self._tokens = 0.0
        self._wandb_run = None
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter
        from tqdm import tqdm

        os.makedirs(self.log_dir, exist_ok=True)
        for name in (METRICS_FILE, WANDB_RUN_ID_FILE):
            uploaded = storage.join(self.remote, name) if self.remote else None
            if uploaded and storage.exists(uploaded):
                # Resuming a gs:// run on a fresh machine: continue the uploaded file instead of replacing it.
                storage.write_bytes(os.path.join(self.log_dir, name), storage.read_bytes(uploaded))
        self._jsonl = open(os.path.join(self.log_dir, METRICS_FILE), "a", encoding="utf-8")
        self._writer = SummaryWriter(self.log_dir)
        if wandb is not None:
            self._wandb_run = self._start_wandb(wandb, run_config, resuming=start_step > 0)
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not progress_bar,
                         dynamic_ncols=True)

    def _start_wandb(self, cfg: WandbConfig, run_config: dict | None, resuming: bool):
        """Start the W&B run, or continue the run folder's one when the trainer resumes from a checkpoint (a run that
        starts over at step 1 gets a new W&B run: the old one's steps would hide the new ones)."""
        wandb = import_wandb()
        id_file = os.path.join(self.log_dir, WANDB_RUN_ID_FILE)
        run_id = None  # W&B picks a new one
        if resuming and os.path.exists(id_file):
            with open(id_file, encoding="utf-8") as f:
                run_id = f.read().strip()
        # W&B's own files go with the run's logs unless WANDB_DIR says where (not ./wandb: tpu.sh ships the working
        # directory to the workers).
        run = wandb.init(project=cfg.project, name=cfg.run, entity=cfg.entity, group=cfg.group, tags=cfg.tags,
                         id=run_id, resume="allow", config=run_config,
                         dir=None if os.environ.get("WANDB_DIR") else self.log_dir)
        with open(id_file, "w", encoding="utf-8") as f:
            f.write(run.id + "\n")
        return run

    def add_tokens(self, tokens: float) -> None:
        """Count tokens processed since the last log line (for tokens/s)."""
        self._tokens += tokens

    def log(self, step: int, metrics: dict[str, float], steps_done: int = 1) -> dict[str, float]:
        """Record `metrics` of optimizer step `step` (1-based); returns them with throughput added."""
        now = time.perf_counter()
        seconds, self._last_time = max(now - self._last_time, 1e-9), now
        record = {"step": step, **metrics, "tokens_per_s": self._tokens / seconds}
        if self.peak_flops:
            record["mfu"] = record["tokens_per_s"] * self.flops_per_token / self.peak_flops
        self._tokens = 0.0
        if not self.enabled:
            return record
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        scalars = {f"train/{name}": value for name, value in record.items() if name != "step"}
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        if self._wandb_run is not None:
            self._wandb_run.log(scalars, step=step)
        mfu = f"{record['mfu']:.1%}" if "mfu" in record else "n/a"
        self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", mfu=mfu,
                              refresh=False)
        self._bar.update(steps_done)
        return record

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Record `scalars` of optimizer step `step` (a hook's, e.g. eval/loss) under their own names, on their own
        JSONL line."""
        if not self.enabled or not scalars:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        if self._wandb_run is not None:
            self._wandb_run.log(scalars, step=step)  # merged into the step's training metrics: same W&B step

    def sync(self) -> None:
        """Flush the files, and upload them when the run folder is on gs://."""
        if not self.enabled:
            return
        self._jsonl.flush()
        self._writer.flush()
        if self.remote:
            storage.upload_dir(self.log_dir, self.remote)

    def close(self) -> None:
        if not self.enabled:
            return
        self.sync()
        self._bar.close()
        self._writer.close()
        self._jsonl.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
