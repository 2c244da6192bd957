"""Training checkpoints (Orbax) and the run folder that makes them loadable as models.

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
import tempfile

import jax
import orbax.checkpoint as ocp

from aloe_jax import storage
from aloe_jax.errors import ModelLoadError
from aloe_jax.models.config import ModelConfig, config_from_hf

RUN_INFO_FILE = "aloe_run.json"
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"


def _absolute(path: str) -> str:
    return path if storage.is_gcs(path) else os.path.abspath(path)


def write_run_files(output_dir: str, objective: str, base_model: str, model_cfg: ModelConfig, tokenizer,
                    scan_layers: bool = False) -> None:
    """Write aloe_run.json and model/ (config.json + tokenizer) into a run folder (process 0 only); `scan_layers`
    records that the checkpoints hold stacked layers."""
    if jax.process_index() != 0:
        return
    model_dir = storage.join(output_dir, MODEL_DIR)
    storage.write_text(storage.join(model_dir, "config.json"), json.dumps(model_cfg.to_hf_dict(), indent=2))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        if storage.is_gcs(model_dir):
            storage.upload_dir(tmp, model_dir)
        else:
            for name in os.listdir(tmp):
                storage.write_bytes(os.path.join(model_dir, name), storage.read_bytes(os.path.join(tmp, name)))
    info = {"objective": objective, "base_model": base_model, "model_type": model_cfg.model_type,
            "scan_layers": scan_layers}
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


def _use_ocdbt(directory: str) -> bool:
    # OCDBT (Orbax's default: a few large files per checkpoint instead of one per array chunk) relies on conditional
    # writes that the GCS emulator used in tests does not implement ("Malformed StorageGeneration"); real Cloud
    # Storage and local disks support them.
    return not (storage.is_gcs(directory) and os.environ.get("STORAGE_EMULATOR_HOST"))


class Checkpointer:
    """Orbax CheckpointManager over `<output_dir>/checkpoints`: local or gs://, keeps `max_to_keep`."""

    def __init__(self, output_dir: str, max_to_keep: int | None = None, create: bool = True):
        import grain

        self.directory = storage.join(_absolute(output_dir), CHECKPOINT_DIR)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
        arrays = ocp.StandardCheckpointHandler(use_ocdbt=_use_ocdbt(self.directory))
        handlers = dict(params=arrays, opt_state=arrays, loop=arrays, meta=ocp.JsonCheckpointHandler(),
                        data=grain.checkpoint.CheckpointHandler())
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (unfinished saves are ignored), or None."""
        return self.manager.latest_step()

    def save(self, state, data_iterator, meta: dict) -> None:
        """Save `state` (a TrainState) at its step, with the data iterator's position; returns once it is queued."""
        import grain

        step = int(jax.device_get(state.step))
        items = dict(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            loop=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
            meta=ocp.args.JsonSave(meta),
        )
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state, data_iterator):
        """The TrainState saved at `step`, placed by the shardings in `abstract_state` (ShapeDtypeStruct leaves);
        the data iterator is moved to where that step left it."""
        import grain

        from aloe_jax.train.step import TrainState

        items = dict(
            params=ocp.args.StandardRestore(abstract_state.params),
            opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
            loop=ocp.args.StandardRestore({"step": abstract_state.step, "rng": abstract_state.rng}),
        )
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return TrainState(restored["loop"]["step"], restored["params"], restored["opt_state"], restored["loop"]["rng"])

    def restore_params(self, step: int | None, abstract_params):
        """Only the params of `step` (latest when None), placed by the shardings in `abstract_params`."""
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            available = ", ".join(map(str, self.manager.all_steps())) or "none"
            raise ModelLoadError(f"no checkpoint of step {step} in {self.directory!r} (saved steps: {available})")
        restored = self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
        return restored["params"]

    def wait(self) -> None:
        """Block until every queued save is on storage."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
