"""Trainer hooks: what runs between optimizer steps (every N steps and/or after the last one), with what it returns
logged at that step; the held-out loss of `eval_data` is the first of them."""

from __future__ import annotations

import abc
import itertools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from aloe_jax.core.errors import ConfigError
from aloe_jax.train.config import TrainConfig
from aloe_jax.train.inputs import pipeline
from aloe_jax.train.step import TrainState, batch_means

if TYPE_CHECKING:
    from aloe_jax.train.trainer import Trainer


class Hook(abc.ABC):
    """Runs after every `every`-th optimizer step (None: never on a cadence) and, when `at_end`, after the last."""

    def __init__(self, every: int | None, at_end: bool = True):
        self.every, self.at_end = every, at_end

    def due(self, step: int, total_steps: int) -> bool:
        """Whether the hook runs after optimizer step `step` (1-based) of `total_steps`."""
        return (self.every is not None and step % self.every == 0) or (self.at_end and step == total_steps)

    @abc.abstractmethod
    def __call__(self, trainer: Trainer, step: int, state: TrainState) -> dict[str, float]:
        """Scalars to log at `step`, by their full names (empty: nothing to log)."""


class HeldOutLoss(Hook):
    """The objective's loss and metrics on held-out trees under the current params, logged as eval/<name>: packed,
    collated, batched and placed on the mesh exactly as the training data, summed over batches and then divided by
    their total weight (so the result is the mean over the whole held-out set, not a mean of batch means)."""

    def __init__(self, cfg: TrainConfig, tokenizer, rejected_branches: bool):
        held_out = cfg.eval_data
        data = cfg.data.model_copy(update={"path": held_out.path, "shuffle": False, "num_epochs": 1})
        available = pipeline.count_steps(data, cfg.batch_size)
        if not available:
            raise ConfigError(f"eval_data.path {held_out.path!r} holds no trees; point it at held-out trees or "
                              f"set eval_data.path=null")
        super().__init__(held_out.every)
        self.num_batches = min(available, held_out.batches or available)
        self.batches = pipeline.tree_batches(data, tokenizer, cfg.batch_size, rejected_branches=rejected_branches)

    def __call__(self, trainer: Trainer, step: int, state: TrainState) -> dict[str, float]:
        totals = None
        for local in itertools.islice(self.batches, self.num_batches):  # a fresh pass from the first batch
            sums = trainer.held_out_sums(state.params, trainer.device_batch(local))
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        means = jax.device_get(batch_means(totals))
        return {f"eval/{name}": float(value) for name, value in means.items()}


def hooks_of(cfg: TrainConfig, tokenizer, rejected_branches: bool) -> list[Hook]:
    """The hooks a run's config asks for."""
    return [HeldOutLoss(cfg, tokenizer, rejected_branches)] if cfg.eval_data.path else []
