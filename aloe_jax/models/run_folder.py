"""What a run folder is: the trainer writes one, and anything that loads a model (the loader, eval, compile, export)
reads it. Kept beside the model code so that loading a trained model never reaches up into the trainer.

A run folder (`output_dir`, local or gs://) holds:

    aloe_run.json          what was trained: objective, base model spec, ModelConfig fields (marks a run folder)
    model/                 config.json (HF format) + tokenizer files: enough to rebuild the decoder and tokenizer
    checkpoints/<step>/    one Orbax checkpoint per saved step: params, opt_state, loop (step, rng), data (grain
                           iterator state, one file per process), meta (JSON)
    logs/                  metrics.jsonl and TensorBoard events

Each checkpoint item is saved and restored separately, so loading a model for evaluation or export reads the
params only, never the (twice as large) optimizer state.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Callable, Sequence, TypeVar

import jax
import orbax.checkpoint as ocp

from aloe_jax.core import storage
from aloe_jax.core.errors import ModelLoadError
from aloe_jax.models.config import ModelConfig, config_from_hf
from aloe_jax.models.tokenizer import save_tokenizer

RUN_INFO_FILE = "aloe_run.json"
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"

T = TypeVar("T")


def absolute(path: str) -> str:
    """`path` made absolute (Orbax needs absolute local paths); gs:// paths unchanged."""
    return path if storage.is_gcs(path) else os.path.abspath(path)


def write_run_files(output_dir: str, objective: str, base_model: str, model_cfg: ModelConfig, tokenizer,
                    scan_layers: bool = False, lora: dict | None = None, base_source: dict | None = None) -> None:
    """Write aloe_run.json and model/ (config.json + tokenizer) into a run folder (process 0 only); `scan_layers`
    records that the checkpoints hold stacked layers, `lora` the LoRA config whose adapters they hold, `base_source`
    where the base's weights came from (`loader.model_source`: a dequantised GGUF says so), kept with the run so
    that an evaluation of its checkpoints states it even after the base moved."""
    if jax.process_index() != 0:
        return
    model_dir = storage.join(output_dir, MODEL_DIR)
    storage.write_text(storage.join(model_dir, "config.json"), json.dumps(model_cfg.to_hf_dict(), indent=2))
    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer(tokenizer, tmp)
        if storage.is_gcs(model_dir):
            storage.upload_dir(tmp, model_dir)
        else:
            for name in os.listdir(tmp):
                storage.write_bytes(os.path.join(model_dir, name), storage.read_bytes(os.path.join(tmp, name)))
    info = {"objective": objective, "base_model": base_model, "model_type": model_cfg.model_type,
            "scan_layers": scan_layers, "lora": lora, **({"base_source": base_source} if base_source else {})}
    storage.write_text(storage.join(output_dir, RUN_INFO_FILE), json.dumps(info, indent=2))


def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if storage.is_gcs(path) else os.path.dirname(os.path.abspath(path))


def resolve_checkpoint(path: str) -> tuple[str, int | None] | None:
    """(run folder, step or None for the latest) when `path` is a run folder, its `checkpoints` folder or one
    `checkpoints/<step>` folder; None when it is none of these."""
    path = path.rstrip("/") or path
    name, parent = os.path.basename(path), _parent(path)
    if storage.exists(storage.join(path, RUN_INFO_FILE)):
        return path, None
    if name == CHECKPOINT_DIR and storage.exists(storage.join(parent, RUN_INFO_FILE)):
        return parent, None
    if name.isdigit() and os.path.basename(parent) == CHECKPOINT_DIR \
            and storage.exists(storage.join(_parent(parent), RUN_INFO_FILE)):
        return _parent(parent), int(name)
    return None


def read_run_info(run_dir: str) -> dict:
    """The run folder's aloe_run.json."""
    try:
        return json.loads(storage.read_text(storage.join(run_dir, RUN_INFO_FILE)))
    except (FileNotFoundError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"run folder {run_dir!r}: unreadable {RUN_INFO_FILE} ({err})") from None


def read_model_config(run_dir: str, **dtypes: str) -> ModelConfig:
    """The ModelConfig a run trained (from model/config.json)."""
    path = storage.join(run_dir, MODEL_DIR, "config.json")
    try:
        hf = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise ModelLoadError(f"run folder {run_dir!r} has no {MODEL_DIR}/config.json: incomplete run folder") from None
    return config_from_hf(hf, source=path, **dtypes)


def array_handler(directory: str) -> ocp.StandardCheckpointHandler:
    """The Orbax handler for the array items (params, optimizer state) of checkpoints under `directory`."""
    # OCDBT (Orbax's default: a few large files per checkpoint instead of one per array chunk) relies on conditional
    # writes that the GCS emulator used in tests does not implement ("Malformed StorageGeneration"); real Cloud
    # Storage and local disks support them.
    use_ocdbt = not (storage.is_gcs(directory) and os.environ.get("STORAGE_EMULATOR_HOST"))
    return ocp.StandardCheckpointHandler(use_ocdbt=use_ocdbt)


def _first_line(err: Exception) -> str:
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return line if len(line) <= 160 else line[:157] + "..."


def restore_step(directory: str, step: int, restore: Callable[[int], T]) -> T:
    """`restore(step)`, or a ModelLoadError naming the step when its checkpoint cannot be read."""
    try:
        return restore(step)
    except ModelLoadError:
        raise
    except Exception as err:  # Orbax and tensorstore raise bare Exceptions for truncated or missing files
        raise ModelLoadError(f"the checkpoint of step {step} in {directory!r} is unreadable ({_first_line(err)}): "
                             f"load another step (checkpoints/<step>) or delete this one") from None


def restore_newest(directory: str, steps: Sequence[int], restore: Callable[[int], T]) -> tuple[T, int, list[int]]:
    """(`restore(step)`, step, the newer steps that failed) for the newest of `steps` whose checkpoint reads; a
    warning line on stderr for each one that does not; a ModelLoadError naming them all when none does."""
    broken: list[int] = []
    for step in sorted(steps, reverse=True):
        try:
            return restore_step(directory, step, restore), step, broken
        except ModelLoadError as err:
            broken.append(step)
            print(f"aloe-jax: warning: {err}; trying an older step", file=sys.stderr, flush=True)
    raise ModelLoadError(f"no readable checkpoint in {directory!r}: steps {', '.join(map(str, broken)) or 'none'} "
                         f"are unreadable (each named above)" if broken else f"no checkpoint in {directory!r}")


def restore_params(run_dir: str, step: int | None, abstract_params):
    """Only the params of checkpoint `step` of a run folder, placed by the shardings in `abstract_params`
    (ShapeDtypeStruct leaves); step None: the newest readable one (an unreadable newer one is a warning)."""
    directory = storage.join(absolute(run_dir), CHECKPOINT_DIR)
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                                    item_handlers=dict(params=array_handler(directory)))

    def restore(at: int):
        return manager.restore(at, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))["params"]

    try:
        if step is None:
            return restore_newest(directory, manager.all_steps(), restore)[0]
        if step not in manager.all_steps():
            available = ", ".join(map(str, manager.all_steps())) or "none"
            raise ModelLoadError(f"no checkpoint of step {step} in {directory!r} (saved steps: {available})")
        return restore_step(directory, step, restore)
    finally:
        manager.close()
