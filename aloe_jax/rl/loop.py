"""The RL loop (`aloe-jax rl`): per iteration, rollouts of the current policy against the simulated user (one folder
per iteration on the conversation engine), then `grpo.epochs` optimizer steps of the shared trainer on the
tree-packed rollouts.

Resume: the trainer state (policy, optimizer, step, RNG) is checkpointed by Orbax after the update of every
`checkpoint.every_steps`-th optimizer step; the rollout position is the state's step (iteration = step / epochs). A
rerun restores the newest checkpoint, and the next iteration's rollouts resume from their committed turns (the
policy's weights are the checkpoint's, so the replies it resamples for an interrupted turn are the ones it would have
sampled; simulator and judge calls replay from the call cache). So a run killed during a rollout or an update and
rerun with the same command logs the metrics an uninterrupted run logs. Metric lines past the restored step (an
update whose checkpoint never landed) are dropped from the metrics JSONL when the run resumes.

The policy's weights reach the sampler by `nnx.update` of the model the sampler reads its parameters from: the
arrays keep their shapes, dtypes and shardings, so nothing recompiles; the policy's session caches are discarded at
every update (their KV belongs to the old weights).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from aloe_jax.conversation.records import TreeRecord
from aloe_jax.core.errors import ConfigError
from aloe_jax.llm.base import ChatBackend
from aloe_jax.rl.config import RLConfig
from aloe_jax.train.inputs.batch import collate_rollouts
from aloe_jax.train.inputs.packing import pack_rollout
from aloe_jax.train.losses import group_advantages

ROLLOUTS_DIR = "rollouts"
CALLS_FILE = "calls.sqlite"
# Token means of these metric sums are metric / reply_tokens (objectives.GRPO).
TOKEN_MEAN_METRICS = ("kl", "clip_fraction", "ratio", "entropy")


def local_dir(cfg: RLConfig) -> str:
    """The local folder of a run's rollouts and call cache: `rollout_dir` when set, else the run folder itself
    when it is local, else a folder of this machine's cache named after the gs:// run folder (the rollouts append
    to their records as they go, which needs a local disk; checkpoints, metrics and the model files go to gs://)."""
    import hashlib

    from aloe_jax.core import storage

    if cfg.rollout_dir:
        return cfg.rollout_dir
    if not storage.is_gcs(cfg.output_dir):
        return cfg.output_dir
    return str(storage.cache_dir() / "runs" / hashlib.sha256(cfg.output_dir.encode()).hexdigest()[:16])


def iteration_folder(root: str, iteration: int) -> str:
    """Where iteration `iteration`'s rollout records and trees live under a run's `local_dir`."""
    return os.path.join(root, ROLLOUTS_DIR, f"iter_{iteration:05d}")


@dataclasses.dataclass
class RolloutBatch:
    """One iteration's rollout trees as a host batch for the trainer, with what was measured building it."""

    batch: dict
    advantages: np.ndarray  # every finite advantage of the batch
    packed_tokens: int  # real tokens of the packed rows
    naive_tokens: int  # tokens the same candidates take as one sequence each (history + reply)
    turns_cut: int


def rollout_batch(trees: Sequence[TreeRecord], tokenizer, cfg: RLConfig, naive_count: bool = False) -> RolloutBatch:
    """Pack each rollout tree into one row (every candidate a side branch of its history), with group-relative
    advantages per reply; `naive_count` also counts the tokens of one sequence per candidate (benchmarks)."""
    from aloe_jax.models.tokenizer import encode_chat

    seq_len = cfg.data.seq_len
    packed, advantages, finite, cut, naive = [], [], [], 0, 0
    for tree in trees:
        p = pack_rollout(tokenizer, tree, seq_len)
        if p is None:
            raise ConfigError(f"rollout {tree.id!r}: not even its first turn (G = {cfg.rollout.group_size} "
                              f"candidates) fits data.seq_len={seq_len}; raise data.seq_len")
        per_turn = [group_advantages([np.nan if c.reward is None else c.reward for c in t.candidates],
                                     cfg.grpo.variant) for t in tree.turns]
        values = [per_turn[turn][cand] for turn, cand in p.replies]
        packed.append(p)
        advantages.append(values)
        finite += [v for v in values if np.isfinite(v)]
        cut += p.turns_cut
        if naive_count:
            kept = len(tree.turns) - p.turns_cut
            naive += sum(len(encode_chat(tokenizer, tree.history(k) + [{"role": "assistant", "content": c.text}])[0])
                         for k in range(kept) for c in tree.turns[k].candidates)
    max_replies = cfg.rollout.group_size * cfg.rollout.turns
    batch = collate_rollouts(packed, advantages, cfg.rollout.cases, seq_len, max_replies)
    return RolloutBatch(batch, np.asarray(finite), int(sum(len(p) for p in packed)), naive, cut)


def rollout_metrics(trees: Sequence[TreeRecord]) -> dict[str, float]:
    """Reward means over every scored candidate: in all, per component, per turn (1-based) and per component per
    turn; the continued candidates' mean; the share of candidates scored; simulator resamples."""
    out: dict[str, list[float]] = {}

    def add(name, value):
        if value is not None and np.isfinite(value):
            out.setdefault(name, []).append(float(value))

    scored = total = 0
    for tree in trees:
        for k, turn in enumerate(tree.turns, start=1):
            for i, cand in enumerate(turn.candidates):
                total += 1
                scored += cand.reward is not None
                add("reward/mean", cand.reward)
                add(f"reward/turn_{k}", cand.reward)
                for part, value in cand.rewards.items():
                    add(f"reward/{part}", value)
                    add(f"reward/{part}/turn_{k}", value)
                if i == turn.continued_candidate:
                    add("reward/continued", cand.reward)
    metrics = {name: float(np.mean(values)) for name, values in sorted(out.items())}
    metrics["scored_fraction"] = scored / max(total, 1)
    return metrics


def update_metrics(metrics: dict) -> dict[str, float]:
    """The trainer's step metrics with the GRPO sums turned into token means."""
    host = {name: float(value) for name, value in jax.device_get(metrics).items()}
    tokens = max(host.get("reply_tokens", 0.0), 1e-9)
    for name in TOKEN_MEAN_METRICS:
        if name in host:
            host[name] = host[name] / tokens
    return host


def _role_seconds(folder: str) -> dict[str, float]:
    from aloe_jax.conversation.engine import TIMINGS_FILE
    from aloe_jax.core import jsonl_log

    seconds: dict[str, float] = {}
    for line in jsonl_log.read_complete(os.path.join(folder, TIMINGS_FILE)):
        for role, s in line.get("seconds", {}).items():
            seconds[role] = seconds.get(role, 0.0) + s
    return seconds


def _drop_metrics_past(log_dir: str, step: int) -> None:
    """Metric lines of steps after `step` (logged before a kill lost their checkpoint) out of the metrics JSONL."""
    from aloe_jax.train.metrics_log import METRICS_FILE

    path = os.path.join(log_dir, METRICS_FILE)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            pass  # a torn last line
    if len(kept) != len(lines):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)


def _fault(point: str, iteration: int) -> None:
    """Test hook: with ALOE_JAX_FAULT=<point>:<iteration> ("rollout:N": in iteration N's second rollout turn, after
    its role calls and before its records are committed; "update:N": after iteration N's first optimizer step,
    before its checkpoint) the process kills itself with SIGKILL, so that the resume tests kill -9 at an exact place
    instead of racing a timer."""
    if os.environ.get("ALOE_JAX_FAULT") == f"{point}:{iteration}":
        os.kill(os.getpid(), signal.SIGKILL)


class _FaultInSecondTurn:
    """A rollout script that runs `_fault("rollout", iteration)` at the end of its second turn."""

    def __init__(self, script, iteration: int):
        self.script, self.iteration = script, iteration
        self.first_turn = script.first_turn

    def __getattr__(self, name):
        return getattr(self.script, name)

    def turn(self, cases, histories, turn, stopwatch):
        records = self.script.turn(cases, histories, turn, stopwatch)
        if turn == self.first_turn + 1:
            _fault("rollout", self.iteration)
        return records


def _redraw_curve(log_dir: str, output_dir: str) -> None:
    from aloe_jax.core import jsonl_log, storage
    from aloe_jax.rl.plot import plot_reward_curve
    from aloe_jax.train.metrics_log import METRICS_FILE

    plot_reward_curve(jsonl_log.read_complete(os.path.join(log_dir, METRICS_FILE), repair=False),
                      storage.join(output_dir, "reward_curve.png"), os.path.basename(output_dir.rstrip("/")))


class Roles:
    """The roles of the rollouts: the policy (the trained model itself, in process), the simulated user, the judge
    and, for an extractor-based persona reward, the extractor."""

    def __init__(self, cfg: RLConfig, engine, backends: dict[str, ChatBackend] | None = None):
        from aloe_jax.conversation.repeat_guard import RepeatGuard
        from aloe_jax.eval.judge import Judge
        from aloe_jax.llm.cache import CallCache
        from aloe_jax.llm.jax_backend import JaxBackend
        from aloe_jax.llm.roles import Role
        from aloe_jax.rl.rewards import Rewards, rl_backend

        backends = backends or {}
        os.makedirs(local_dir(cfg), exist_ok=True)
        cache = CallCache(os.path.join(local_dir(cfg), CALLS_FILE)) if cfg.cache_calls else None
        backend = lambda name, c: backends.get(name) or rl_backend(c)  # noqa: E731
        self.policy = Role("policy", JaxBackend(engine=engine, name="policy"), None)
        self.simulator = Role("simulator", backend("simulator", cfg.simulator.backend), cache)
        judge_role = Role("judge", backend("judge", cfg.judge.backend), cache)
        method = cfg.judge.resolved_method()
        if cfg.judge.method == "auto" and cfg.judge.backend.kind == "keyword":
            method = "logprobs"  # the rule-based judge scores options
        judge = Judge(judge_role, method, cfg.judge.max_retries, cfg.judge.max_tokens)
        embed = extractor = None
        if cfg.reward.persona or cfg.simulator.repeat_threshold is not None:
            from aloe_jax.models.sentence_encoder import SentenceEncoder

            embed = SentenceEncoder().encode
        if cfg.reward.persona and cfg.reward.persona_source == "extractor":
            extractor = Role("extractor", backend("extractor", cfg.extractor.backend), cache)
        self.rewards = Rewards(cfg.reward, judge, cfg.judge.history_turns, cfg.rollout.generation.max_tokens, embed,
                               extractor, cfg.extractor.generation)
        self.guard = RepeatGuard.from_config(cfg.simulator, embed if cfg.simulator.repeat_threshold is not None
                                             else None)


def run(cfg: RLConfig, backends: dict[str, ChatBackend] | None = None, show_progress: bool = True) -> dict[str, float]:
    """Train as `cfg` says, resuming from the run folder's newest checkpoint; `backends` (role name → backend)
    replaces the configured backend of a role (tests). Returns the last iteration's metrics."""
    from aloe_jax.conversation.aloe_pools import load_pool
    from aloe_jax.core import distributed
    from aloe_jax.models import sharding
    from aloe_jax.rl.rollouts import RolloutScript, draw_cases, run_rollouts
    from aloe_jax.sampling.chat import ChatEngine
    from aloe_jax.sampling.sessions import SessionCache
    from aloe_jax.train.inputs.pipeline import global_batch
    from aloe_jax.train.metrics_log import MetricsLogger, import_wandb, peak_flops_per_device
    from aloe_jax.train.objectives import objective_of
    from aloe_jax.train.trainer import Trainer, _check_resume_layout, _load, resume_or_start

    from aloe_jax.core import storage

    if cfg.rollout_dir and storage.is_gcs(cfg.rollout_dir):
        raise ConfigError(f"rollout_dir {cfg.rollout_dir!r}: rollouts append to their records as they go, which "
                          f"needs a local folder")
    _check_resume_layout(cfg)
    if cfg.log.wandb:
        import_wandb()
    # The pools first: a wrong rollout.aloe_data is one line now, not after the model loads.
    profiles = load_pool("profile", cfg.rollout.pool_split, cfg.rollout.aloe_data)
    personalities = load_pool("personality", cfg.rollout.pool_split, cfg.rollout.aloe_data)
    draw_cases(profiles, personalities, cfg.rollout.cases, cfg.seed, 0)  # n too large: one line now
    distributed.maybe_initialize()
    mesh = sharding.make_mesh(cfg.mesh)
    objective = objective_of(cfg)
    model, tokenizer = _load(cfg.model.path, cfg, mesh)
    ref_model = _load(objective.reference_model, cfg, mesh)[0] if (objective.holds_reference
                                                                   and objective.reference_model) else None
    epochs = cfg.grpo.epochs
    total_steps = cfg.iterations * epochs
    trainer = Trainer(cfg, model, mesh, total_steps, ref_model)
    # The sampler reads the parameters of `model` at every call; the trainer's state gets them each iteration.
    engine = ChatEngine(model, tokenizer, mesh)
    roles = Roles(cfg, engine, backends)

    checkpointer, state = resume_or_start(cfg, trainer, tokenizer)
    start_step = int(jax.device_get(state.step))
    start = start_step // epochs
    logger = MetricsLogger(cfg.output_dir, cfg.iterations, start,
                           objective.flops_per_token(trainer.model_cfg, cfg.data.seq_len),
                           peak_flops_per_device(cfg.log.peak_flops_per_device), cfg.log.progress_bar,
                           wandb=cfg.log.wandb, run_config=cfg.model_dump(mode="json"))
    if jax.process_index() == 0:
        _drop_metrics_past(logger.log_dir, start)
        print(f"trainable parameters: {trainer.num_trainable:,} of {trainer.num_params:,}", flush=True)
    meta = {"config": cfg.model_dump(mode="json")}
    record: dict[str, float] = {}
    try:
        for iteration in range(start, cfg.iterations):
            nnx.update(model, state.params)  # this iteration's policy, without recompiling
            if cfg.rollout.sessions:
                engine.sessions = SessionCache(model, engine.sampler.stop_ids, None, 8 * 2**30, mesh)
            cases = draw_cases(profiles, personalities, cfg.rollout.cases, cfg.seed, iteration)
            folder = iteration_folder(local_dir(cfg), iteration)
            began = time.perf_counter()
            script = RolloutScript(cfg, iteration, roles.policy, roles.simulator, roles.rewards, roles.guard)
            if os.environ.get("ALOE_JAX_FAULT"):
                script = _FaultInSecondTurn(script, iteration)
            trees = run_rollouts(cfg, iteration, folder, cases, script, show_progress=False)
            rollout_s = time.perf_counter() - began
            built = rollout_batch(trees, tokenizer, cfg)
            began = time.perf_counter()
            batch = global_batch({name: built.batch[name] for name in objective.batch_fields
                                  if name != "old_logprobs"}, mesh)
            # Rollout-time log-probs: the policy that sampled, before its first update on this batch.
            batch["old_logprobs"] = trainer.label_logprobs(state.params, batch)
            for epoch in range(epochs):
                state, metrics = trainer.step(state, batch)
                if epoch == 0:
                    _fault("update", iteration)
            update = update_metrics(metrics)
            update_s = time.perf_counter() - began
            generated = sum(c.tokens or 0 for t in trees for turn in t.turns for c in turn.candidates)
            roles_s = _role_seconds(folder)
            logger.add_tokens(built.packed_tokens * epochs)
            record = logger.log(iteration + 1, {
                **update, **rollout_metrics(trees),
                "advantage_std": float(np.std(built.advantages)) if built.advantages.size else 0.0,
                "turns_cut": float(built.turns_cut), "packed_tokens": float(built.packed_tokens),
                "rollout_s": rollout_s, "update_s": update_s,
                "rollout_tokens_per_s": generated / max(roles_s.get("policy", rollout_s), 1e-9),
                "update_tokens_per_s": built.packed_tokens * epochs / max(update_s, 1e-9),
                **{f"seconds/{role}": s for role, s in roles_s.items()}})
            step = (iteration + 1) * epochs
            if step % cfg.checkpoint.every_steps == 0 or iteration + 1 == cfg.iterations:
                checkpointer.save(state, None, {**meta, "iteration": iteration + 1})
                logger.sync()
            if jax.process_index() == 0:
                _redraw_curve(logger.log_dir, cfg.output_dir)
    finally:
        checkpointer.wait()
        checkpointer.close()
        logger.close()
    if jax.process_index() == 0:
        print(f"done: {cfg.iterations} iterations; checkpoints in {checkpointer.directory}", flush=True)
    return record
