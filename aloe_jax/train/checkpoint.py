"""Training checkpoints (Orbax) inside a run folder (see `aloe_jax.models.run_folder` for its layout): the whole
train state with the data iterator's position, so that a killed run resumes where it stopped."""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp

from aloe_jax.core import storage
from aloe_jax.models.run_folder import CHECKPOINT_DIR, absolute, array_handler


class Checkpointer:
    """Orbax CheckpointManager over `<output_dir>/checkpoints`: local or gs://, keeps `max_to_keep`."""

    def __init__(self, output_dir: str, max_to_keep: int | None = None, create: bool = True):
        import grain

        self.directory = storage.join(absolute(output_dir), CHECKPOINT_DIR)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
        arrays = array_handler(self.directory)
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

    def wait(self) -> None:
        """Block until every queued save is on storage."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
