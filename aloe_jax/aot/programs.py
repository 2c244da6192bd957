"""The programs a config runs, built from shapes alone: no weights are read, every parameter and batch field is a
ShapeDtypeStruct with the sharding the run gives it on the slice's mesh.

- A train config (configs/sft.yaml, configs/runs/*.yaml): the SFT or DPO optimizer step exactly as the Trainer wires
  it (its model, runtime options, dtypes, mesh, batch, micro-batches; DPO with the frozen reference as an argument).
- An RL config (configs/rl.yaml, configs/runs/*-rl-*.yaml): the GRPO optimizer step on the packed rollout rows
  (rows = rollout.cases, G × K replies per row, the rollout-time log-probs as an input; the frozen reference as an
  argument when kl_coef > 0). The rollouts' sampling and the rollout-time forward are not compiled.
- An eval config (configs/eval.yaml): the model under test's generation program at the evaluation's largest shape.
  The sampler runs prefill and decode loop as one program, so that is what is compiled: rows = cases, prompt = the
  last turn's upper bound (see `longest_eval_prompt`), decode steps = the model's max_tokens, each bucketed as the
  sampler buckets them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import yaml
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aloe_jax.core import storage
from aloe_jax.core.errors import ConfigError
from aloe_jax.eval.config import EvalConfig
from aloe_jax.models import sharding
from aloe_jax.models.config import ModelConfig, read_hf_config
from aloe_jax.models.presets import HF_PRESETS, preset_config
from aloe_jax.models.weights import abstract_model
from aloe_jax.train.config import TrainConfig
from aloe_jax.train.objectives import forward_flops_per_token


@dataclasses.dataclass(frozen=True)
class Program:
    """One program of a run, ready to lower, with what the model's arithmetic says about one execution of it."""

    name: str  # "sft_step", "dpo_step", "grpo_step", "generate"
    shapes: str  # what one execution processes, in words
    lower: Callable[[], jax.stages.Lowered]
    model_flops: float  # analytic FLOPs of one execution, all chips (matmuls + attention; no recomputation)
    tokens: int  # tokens one execution trains on (step) or generates (generate), all chips
    # How many times one execution must at least read each argument byte from HBM: a decode loop reads every weight
    # once per generated token.
    argument_reads: int = 1


# ---- architecture ------------------------------------------------------------------------------------------------

# ModelConfig fields that `arch.FIELD=VALUE` may change (positive integers: the sizes of the architecture).
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim", "max_position_embeddings")


def _normalised(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def preset_named_in(text: str) -> str | None:
    """The preset whose name's parts all appear in `text` (`Meta-Llama-3-8B-Instruct` → llama3-8b), the longest
    such name when several do (`Llama-3.1-8B` → llama3.1-8b), or None."""
    name = _normalised(text)
    matches = [p for p in HF_PRESETS if all(_normalised(part) in name for part in p.split("-"))]
    return max(matches, key=len, default=None)


def _apply_sizes(cfg: ModelConfig, changes: Sequence[str]) -> ModelConfig:
    sizes = {}
    for item in changes:
        field, sep, raw = item.partition("=")
        value = yaml.safe_load(raw) if sep else None
        if field not in SIZE_FIELDS or not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"arch.{item}: expected arch.FIELD=POSITIVE_INTEGER with FIELD one of "
                              f"{', '.join(SIZE_FIELDS)}")
        sizes[field] = value
    return cfg.replace(**sizes) if sizes else cfg


def resolve_architecture(spec: str | None, dtypes: dict, preset: str | None = None, config_path: str = "",
                         changes: Sequence[str] = ()) -> tuple[ModelConfig, str]:
    """(ModelConfig, where it came from) of the model a config names, without reading weights or gs://: `preset`
    when given; a preset name (or the embedded SmolLM2) as such; a local HF folder or trainer run by its config.json;
    a gs:// path by the preset its name (or the config file's name) matches. `changes` then resize it."""
    from aloe_jax.models.loader import DEFAULT_MODEL, EMBEDDED_NAMES
    from aloe_jax.models.run_folder import read_model_config, resolve_checkpoint

    spec = spec or DEFAULT_MODEL
    if preset is not None:
        cfg, source = preset_config(preset, **dtypes), f"preset {preset} (--preset)"
    elif spec.lower() in EMBEDDED_NAMES or spec in HF_PRESETS:
        name = DEFAULT_MODEL if spec.lower() in EMBEDDED_NAMES else spec
        cfg, source = preset_config(name, **dtypes), f"preset {name}"
    elif storage.is_gcs(spec):
        name = preset_named_in(spec.rstrip("/").rsplit("/", 1)[-1]) or preset_named_in(
            re.sub(r"\.ya?ml$", "", str(config_path).rsplit("/", 1)[-1]))
        if name is None:
            raise ConfigError(f"model {spec!r} is on gs://, which compile does not read, and its name matches no "
                              f"preset: name the architecture with --preset ({', '.join(HF_PRESETS)})")
        cfg = preset_config(name, **dtypes)
        source = f"preset {name}, inferred from the name {spec} (not read; --preset chooses another)"
    else:
        found = resolve_checkpoint(spec)
        if found is not None:
            cfg, source = read_model_config(found[0], **dtypes), f"trainer run {found[0]}"
        else:
            cfg, source = read_hf_config(spec, **dtypes), f"config.json of {spec}"
    if changes:
        cfg, source = _apply_sizes(cfg, changes), f"{source}, with " + " ".join(f"arch.{c}" for c in changes)
    return cfg, source


# ---- programs ----------------------------------------------------------------------------------------------------

def slice_mesh(mesh_cfg: sharding.MeshConfig, devices: list) -> Mesh:
    """The run's (data, fsdp, tensor) mesh over the slice's devices, laid out as jax.make_mesh lays out a real slice."""
    auto = (jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES)
    return jax.make_mesh(mesh_cfg.shape(len(devices)), sharding.MESH_AXES, axis_types=auto, devices=devices)


def host_batch_layout(cfg: TrainConfig, objective: str) -> dict:
    """A host batch of the run's shapes, all padding: SFT/DPO's packed trees (`collate`), or for GRPO (an RL config)
    the packed rollout rows of `loop.rollout_batch` — rows = rollout.cases, replies per row = G × K
    (`reply_advantage`, `reply_weight`) — plus the rollout-time label log-probs `[rows, seq]` the trainer adds."""
    import numpy as np

    from aloe_jax.train.inputs.batch import collate, collate_rollouts

    if objective == "grpo":
        max_replies = cfg.rollout.group_size * cfg.rollout.turns
        host = collate_rollouts([], [], cfg.batch_size, cfg.data.seq_len, max_replies)
        host["old_logprobs"] = np.zeros((cfg.batch_size, cfg.data.seq_len), np.float32)
        return host
    return collate([], cfg.batch_size, cfg.data.seq_len, cfg.data.max_pairs)


def train_program(cfg: TrainConfig, model_cfg: ModelConfig, devices: list) -> Program:
    """The SFT, DPO or GRPO optimizer step of a train or RL config, as the Trainer compiles it."""
    from aloe_jax.train.step import batch_shardings
    from aloe_jax.train.trainer import Trainer, runtime_options

    mesh = slice_mesh(cfg.mesh, devices)
    model = abstract_model(model_cfg, runtime_options(cfg))
    # A reference (DPO's) is a frozen model of the same architecture: another argument with the policy's shardings;
    # an objective without one ignores it.
    trainer = Trainer(cfg, model, mesh, cfg.max_steps or 1, ref_model=model)
    objective = trainer.objective
    host = host_batch_layout(cfg, objective.name)
    host = {name: host[name] for name in objective.batch_fields}
    placed = batch_shardings(host, mesh)
    batch = {name: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placed[name]) for name, a in host.items()}
    tokens = cfg.batch_size * cfg.data.seq_len
    return Program(
        name=f"{objective.name}_step",
        shapes=(f"batch {cfg.batch_size} x {cfg.data.seq_len} tokens"
                + (f" (packed rollouts of G={cfg.rollout.group_size} x K={cfg.rollout.turns} replies)"
                   if objective.name == "grpo" else "")
                + f", micro_batches {cfg.micro_batches}, "
                f"mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']} tensor={mesh.shape['tensor']}, "
                f"{cfg.model.param_dtype} params, {cfg.model.dtype} compute, "
                + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(model.options).items())),
        lower=lambda: trainer.lower(trainer.abstract_state, batch),
        model_flops=objective.flops_per_token(model_cfg, cfg.data.seq_len) * tokens,
        tokens=tokens,
    )


# Upper bounds on chat-template tokens: around each message (role header and end marker: 5 in ChatML and Llama 3),
# and before the first one (a default system prompt, Llama 3's date header).
MESSAGE_TEMPLATE_TOKENS, PREAMBLE_TOKENS = 8, 64


def longest_eval_prompt(cfg: EvalConfig) -> int:
    """Upper bound on the model under test's longest prompt: that of the last turn, the system prompt (at most one
    token per character) and turns - 1 exchanges of full-length messages before the simulator's last message."""
    user, reply = cfg.simulator.generation.max_tokens, cfg.model.generation.max_tokens
    system = len(cfg.model.system_prompt) + MESSAGE_TEMPLATE_TOKENS if cfg.model.system_prompt else 0
    exchange = user + reply + 2 * MESSAGE_TEMPLATE_TOKENS
    return PREAMBLE_TOKENS + system + (cfg.turns - 1) * exchange + user + 2 * MESSAGE_TEMPLATE_TOKENS


def generate_program(cfg: EvalConfig, model_cfg: ModelConfig, devices: list) -> Program:
    """The model under test's generation program at the evaluation's largest shape, as its Sampler compiles it."""
    from aloe_jax.sampling.sampler import SamplingParams, generation_program, padded_shape

    # As the evaluation runs it: the batch over every device when there are several (weights replicated).
    mesh = slice_mesh(sharding.MeshConfig(data=-1), devices) if cfg.model.use_mesh and len(devices) > 1 else None
    gen = cfg.model.generation
    params = SamplingParams(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                            max_new_tokens=gen.max_tokens)
    rows, prompt_len, steps = padded_shape(cfg.cases, longest_eval_prompt(cfg), gen.max_tokens, mesh)
    model = abstract_model(model_cfg)
    graphdef, state = nnx.split(model)
    if mesh is None:
        one_chip = jax.sharding.SingleDeviceSharding(devices[0])
        param_shardings = jax.tree.map(lambda _: one_chip, state)
        rows_of = replicated = lambda ndim: one_chip  # noqa: E731
    else:
        param_shardings = sharding.param_state_shardings(model, mesh)
        rows_of = lambda ndim: sharding.batch_sharding(mesh, ndim)  # noqa: E731
        replicated = lambda ndim: NamedSharding(mesh, PartitionSpec())  # noqa: E731

    def arg(shape, dtype, placement):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=placement(len(shape)))

    # The arguments of Sampler.generate: state, left-padded tokens, prompt lengths, token budgets, stop ids,
    # temperature, top_p, seed.
    args = (jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                         state, param_shardings),
            arg((rows, prompt_len), jnp.int32, rows_of), arg((rows,), jnp.int32, rows_of),
            arg((rows,), jnp.int32, rows_of), arg((max(1, len(model_cfg.eos_token_ids)),), jnp.int32, replicated),
            arg((), jnp.float32, replicated), arg((), jnp.float32, replicated), arg((), jnp.uint32, replicated))
    program = generation_program(graphdef, params, model_cfg.vocab_size, steps, mesh)
    # Every row is prefilled and decoded over the whole static cache until the loop ends.
    flops = rows * (prompt_len * forward_flops_per_token(model_cfg, prompt_len)
                    + (steps - 1) * forward_flops_per_token(model_cfg, prompt_len + steps))
    return Program(
        name="generate",
        shapes=(f"{rows} rows ({cfg.cases} cases) x {prompt_len} prompt tokens (last of {cfg.turns} turns, upper "
                f"bound) + {steps} decode steps, prefill and decode loop in one program, {cfg.model.dtype}, "
                + ("batch over all chips" if mesh is not None else "one chip")),
        lower=lambda: program.lower(*args),
        model_flops=flops,
        tokens=cfg.cases * gen.max_tokens,
        argument_reads=steps,
    )
