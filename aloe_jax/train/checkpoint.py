"""Training checkpoints (Orbax) inside a run folder (see `aloe_jax.models.run_folder` for its layout): the whole
train state with the data iterator's position, so that a killed run resumes where it stopped."""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp

from aloe_jax.core import storage
from aloe_jax.models.run_folder import CHECKPOINT_DIR, absolute, array_handler, restore_newest, restore_step


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
        try:
            # A background save of an earlier step that failed raises here.
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as err:
            raise storage.disk_full(err, self.directory) or err

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

        def restore(at: int) -> TrainState:
            restored = self.manager.restore(at, args=ocp.args.Composite(**items))
            return TrainState(restored["loop"]["step"], restored["params"], restored["opt_state"],
                              restored["loop"]["rng"])

        return restore_step(self.directory, step, restore)

    def restore_latest(self, abstract_state, data_iterator):
        """(TrainState, step) of the newest readable checkpoint, as `restore` gives it, or None when there is none.
        Newer unreadable ones are named in a warning line each and deleted: the resumed run trains those steps again
        and saves them anew (Orbax will not save over a step that exists)."""
        if self.latest_step() is None:
            return None
        state, step, broken = restore_newest(self.directory, self.manager.all_steps(),
                                             lambda at: self.restore(at, abstract_state, data_iterator))
        for unreadable in broken:
            self.manager.delete(unreadable)
        return state, step

    def wait(self) -> None:
        """Block until every queued save is on storage."""
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise storage.disk_full(err, self.directory) or err

    def close(self) -> None:
        self.manager.close()
