"""The training loop shared by every objective: model + data + jit'd step + hooks + checkpoints + metrics.

`Trainer` holds what is fixed for a run (objective, optimizer, shardings, the compiled step); `run` wires it to the
data pipeline, the hooks, the checkpoints and the logs, resuming from the latest checkpoint of the run folder when
there is one.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aloe_jax.core.errors import ConfigError
from aloe_jax.models import lora, sharding
from aloe_jax.models.decoder import Decoder, RuntimeOptions
from aloe_jax.train import optim
from aloe_jax.train.config import TrainConfig
from aloe_jax.train.hooks import Hook
from aloe_jax.train.inputs.pipeline import global_batch
from aloe_jax.train.objectives import objective_of
from aloe_jax.train.objectives import FORWARD_FIELDS
from aloe_jax.train.step import (StepContext, TrainState, compile_train_step, init_state, make_label_logprobs_fn,
                                 make_loss_sums_fn, make_train_step, split_trainable, train_state_shardings)


class Trainer:
    """Objective, optimizer, shardings and the compiled step of one run: `init_state()`, then
    `step(state, device_batch(local_batch))`."""

    def __init__(self, cfg: TrainConfig, model: Decoder, mesh: Mesh, total_steps: int,
                 ref_model: Decoder | None = None):
        rows_per_pass = cfg.batch_size // cfg.micro_batches
        batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
        if rows_per_pass % batch_devices:
            raise ConfigError(
                f"batch_size / micro_batches = {rows_per_pass} rows per pass must be divisible by mesh data × fsdp "
                f"= {batch_devices}; change batch_size, micro_batches or mesh"
            )
        self.cfg, self.mesh, self.total_steps, self.model_cfg = cfg, mesh, total_steps, model.cfg
        # With LoRA the model gets its adapters before the split, and only they train (no optimizer state for the
        # base); a reference model gets zero-effect adapters too, so that it fits the policy's graph.
        self.trainable = lora.LoraParam if cfg.lora is not None else None
        if cfg.lora is not None:
            for adapted in (model,) if ref_model is None or ref_model is model else (model, ref_model):
                sharding.shard_model(lora.add_adapters(adapted, cfg.lora, nnx.Rngs(cfg.seed)), mesh)
        self.graphdef, self._params = nnx.split(model)
        self.num_params = sum(x.size for x in jax.tree.leaves(self._params))
        self.num_trainable = sum(x.size for x in jax.tree.leaves(split_trainable(self._params, self.trainable)[0]))
        self.param_shardings = sharding.param_state_shardings(model, mesh)
        self.schedule = optim.learning_rate_schedule(cfg.optim, total_steps)
        self.tx = optim.make_optimizer(cfg.optim, total_steps)
        self.objective = objective_of(cfg)
        self.ref_params = None
        if self.objective.holds_reference:
            # A frozen copy of its own: the policy's buffers are donated to (and overwritten by) every step.
            self.ref_params = nnx.split(ref_model)[1] if ref_model is not None else jax.tree.map(jnp.copy, self._params)
        abstract = jax.eval_shape(lambda p: init_state(p, self.tx, cfg.seed, self.trainable), self._params)
        self.shardings = train_state_shardings(self.param_shardings, abstract, self.tx, mesh, self.trainable)
        self.abstract_state = jax.tree.map(
            lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), abstract, self.shardings)
        dropout = cfg.lora is not None and cfg.lora.dropout > 0
        context = StepContext(self.graphdef, self.objective, cfg.micro_batches, mesh, self.trainable, dropout)
        self._step_fn = make_train_step(context, self.tx, self.schedule)
        self._loss_sums = jax.jit(make_loss_sums_fn(context), out_shardings=NamedSharding(mesh, PartitionSpec()))
        self._label_logprobs = jax.jit(make_label_logprobs_fn(context),
                                       out_shardings=sharding.batch_sharding(mesh, 2))
        self._compiled = None

    def init_state(self) -> TrainState:
        """Step 0 state placed on the mesh (takes over the model's parameter buffers)."""
        params, self._params = self._params, None
        init = jax.jit(lambda p: init_state(p, self.tx, self.cfg.seed, self.trainable), out_shardings=self.shardings,
                       donate_argnums=(0,))
        return init(params)

    def release_initial_params(self) -> None:
        """Drop the model's starting parameters when the state comes from a checkpoint instead."""
        self._params = None

    def lower(self, state: TrainState, batch: dict) -> jax.stages.Lowered:
        """The step lowered for these arguments (arrays or ShapeDtypeStructs with shardings): `.compile()` is the
        program `step` runs."""
        ref_shardings = self.param_shardings if self.ref_params is not None else None
        jitted = compile_train_step(self._step_fn, self.shardings, batch, ref_shardings, self.mesh)
        return jitted.lower(state, batch, self.ref_params)

    def device_batch(self, local_batch: dict) -> dict:
        """The objective's fields of this process's host batch, assembled into global arrays on the mesh."""
        return global_batch({name: local_batch[name] for name in self.objective.batch_fields}, self.mesh)

    def held_out_sums(self, params: nnx.State, batch: dict) -> dict:
        """The objective's loss and metric sums (see `step.batch_means`) of a global batch under `params`, without
        gradients."""
        return self._loss_sums(params, self.ref_params, batch)

    def label_logprobs(self, params: nnx.State, batch: dict) -> jax.Array:
        """`[rows, seq]` label log-probs of a global batch under `params` (GRPO's rollout-time log-probs), split
        over the mesh as the batch is."""
        return self._label_logprobs(params, {name: batch[name] for name in FORWARD_FIELDS})

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One optimizer step on a global batch (jax.Arrays over the mesh); `state` is donated."""
        if self._compiled is None:
            self._compiled = self.lower(state, batch).compile()
            if jax.process_count() > 1:
                # Processes finish compiling at different times; the first collective of the step gives its peers
                # only ~30 s (gloo on CPU) to join, so start the first step together.
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("aloe_jax train step compiled")
        return self._compiled(state, batch, self.ref_params)


def runtime_options(cfg: TrainConfig) -> RuntimeOptions:
    """How the run's model executes (remat, layer scan, attention kind, log-prob chunks), from its config."""
    return RuntimeOptions(remat=cfg.remat, scan_layers=cfg.scan_layers, attention=cfg.attention,
                          attention_block=cfg.attention_block, logits_chunk=cfg.logits_chunk)


def _load(spec: str | None, cfg: TrainConfig, mesh: Mesh):
    from aloe_jax.models.loader import load_model

    return load_model(spec, param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype, mesh=mesh,
                      options=runtime_options(cfg))


def _check_resume_layout(cfg: TrainConfig) -> None:
    """A run folder's checkpoints hold layers in the layout they were trained with, and the LoRA adapters it was
    trained with: resuming with another scan_layers or lora setting cannot restore them, so say so before anything
    loads."""
    from aloe_jax.core import storage
    from aloe_jax.models.run_folder import RUN_INFO_FILE, read_run_info

    if not cfg.checkpoint.resume or not storage.exists(storage.join(cfg.output_dir, RUN_INFO_FILE)):
        return
    info = read_run_info(cfg.output_dir)
    saved = info.get("scan_layers", False)
    if saved != cfg.scan_layers:
        raise ConfigError(f"output_dir {cfg.output_dir!r} was trained with scan_layers={str(saved).lower()}; resume "
                          f"it with scan_layers={str(saved).lower()} (or use a new output_dir)")
    saved_lora = info.get("lora")
    if saved_lora != (cfg.lora.model_dump(mode="json") if cfg.lora is not None else None):
        raise ConfigError(f"output_dir {cfg.output_dir!r} was trained with lora={saved_lora}; resume it with that "
                          f"lora setting (or use a new output_dir)")


def resume_or_start(cfg: TrainConfig, trainer: Trainer, tokenizer, data_iterator=None):
    """(the run folder's Checkpointer, the state to train from): the newest readable checkpoint's (the data iterator
    moved to where it left off), or step 0 with the run folder's model files written."""
    from aloe_jax.core.errors import AloeError
    from aloe_jax.models.loader import DEFAULT_MODEL, model_source
    from aloe_jax.models.run_folder import write_run_files
    from aloe_jax.train.checkpoint import Checkpointer

    checkpointer = Checkpointer(cfg.output_dir, cfg.checkpoint.max_to_keep)
    resumed = checkpointer.restore_latest(trainer.abstract_state, data_iterator) if cfg.checkpoint.resume else None
    if resumed is not None:
        state, latest = resumed
        trainer.release_initial_params()
        print(f"resuming from the checkpoint of step {latest} in {checkpointer.directory}", flush=True)
        return checkpointer, state
    state = trainer.init_state()
    try:
        base_source = model_source(cfg.model.path)
    except AloeError:
        base_source = None  # a source that cannot be described (it loaded, so this is only provenance lost)
    write_run_files(cfg.output_dir, trainer.objective.name, cfg.model.path or DEFAULT_MODEL, trainer.model_cfg,
                    tokenizer, scan_layers=cfg.scan_layers,
                    lora=cfg.lora.model_dump(mode="json") if cfg.lora is not None else None, base_source=base_source)
    return checkpointer, state


def run(cfg: TrainConfig, hooks: Sequence[Hook] = ()) -> dict[str, float]:
    """Train as `cfg` says (resuming when the run folder has a checkpoint), running the config's hooks and then
    `hooks` after the steps each is due; returns the last logged training metrics."""
    from aloe_jax.core import distributed
    from aloe_jax.train.inputs import pipeline
    from aloe_jax.train.inputs.sources import open_tree_source
    from aloe_jax.train.hooks import hooks_of
    from aloe_jax.train.metrics_log import MetricsLogger, import_wandb, peak_flops_per_device

    _check_resume_layout(cfg)
    if cfg.log.wandb:
        import_wandb()  # a missing wandb is one line now, not after minutes of loading the model
    # Open the data before any model loads: a wrong data.path or eval_data.path is one line now, not after minutes.
    data = pipeline.repeated_for_steps(cfg.data, cfg.batch_size, cfg.max_steps)
    total_steps = cfg.max_steps or pipeline.count_steps(data, cfg.batch_size)
    if cfg.eval_data.path:
        open_tree_source(cfg.eval_data.path, cfg.data.split)
    distributed.maybe_initialize()
    mesh = sharding.make_mesh(cfg.mesh)
    objective = objective_of(cfg)
    model, tokenizer = _load(cfg.model.path, cfg, mesh)
    reference = objective.reference_model if objective.needs_reference else None
    ref_model = _load(reference, cfg, mesh)[0] if reference else None
    trainer = Trainer(cfg, model, mesh, total_steps, ref_model)
    if jax.process_index() == 0:
        print(f"trainable parameters: {trainer.num_trainable:,} of {trainer.num_params:,}", flush=True)
    batches = iter(pipeline.tree_batches(data, tokenizer, cfg.batch_size,
                                         rejected_branches=objective.rejected_branches))
    hooks = [*hooks_of(cfg, tokenizer, objective.rejected_branches), *hooks]

    checkpointer, state = resume_or_start(cfg, trainer, tokenizer, batches)
    del model  # its buffers now belong to `state`

    start = int(jax.device_get(state.step))
    logger = MetricsLogger(cfg.output_dir, total_steps, start,
                           objective.flops_per_token(trainer.model_cfg, cfg.data.seq_len),
                           peak_flops_per_device(cfg.log.peak_flops_per_device), cfg.log.progress_bar,
                           wandb=cfg.log.wandb, run_config=cfg.model_dump(mode="json"))
    report = pipeline.PackingReport()
    meta = {"config": cfg.model_dump(mode="json")}
    record: dict[str, float] = {}
    pending: list[dict] = []
    try:
        for step in range(start + 1, total_steps + 1):
            local = next(batches)
            report.update(local)
            state, metrics = trainer.step(state, trainer.device_batch(local))
            pending.append(metrics)
            if step % cfg.log.every_steps == 0 or step == total_steps:
                host = jax.device_get(pending)  # the only device→host sync of the loop
                logger.add_tokens(sum(float(m["tokens"]) for m in host))
                record = logger.log(step, {k: float(v) for k, v in host[-1].items()}, len(host))
                pending = []
            for hook in hooks:
                if hook.due(step, total_steps):
                    logger.log_scalars(step, hook(trainer, step, state))
            if step % cfg.checkpoint.every_steps == 0 or step == total_steps:
                checkpointer.save(state, batches, meta)
                logger.sync()
    finally:
        checkpointer.wait()
        checkpointer.close()
        logger.close()
    if jax.process_index() == 0:
        print(report.summary(), flush=True)
        print(f"done: {total_steps} steps; checkpoints in {checkpointer.directory}", flush=True)
    return record
