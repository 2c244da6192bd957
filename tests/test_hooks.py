"""Trainer hooks: when a hook runs, and the held-out-loss hook of `eval_data` on tiny SFT and DPO runs — eval/loss and
the objective's metrics in the metrics JSONL and TensorBoard at the configured steps and after the last, each equal to
the objective's loss computed directly on the held-out trees with the params the run had at that step."""

import json
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aloe_jax.models.loader import load_model
from aloe_jax.train.config import DPOConfig, TrainConfig
from aloe_jax.train.hooks import Hook
from aloe_jax.train.inputs.batch import collate
from aloe_jax.train.inputs.packing import pack_tree, packed_attention_mask
from aloe_jax.train.objectives import DPO
from aloe_jax.train.trainer import run
from tests.test_packing import make_tree
from tests.test_train_cli import make_model_dir

SEQ_LEN, MAX_PAIRS, ROWS = 256, 2, 2


class _Every(Hook):
    def __call__(self, trainer, step, state):
        return {}


def test_a_hook_is_due_every_n_steps_and_after_the_last():
    due = lambda hook, total: [s for s in range(1, total + 1) if hook.due(s, total)]  # noqa: E731
    assert due(_Every(3), 7) == [3, 6, 7]
    assert due(_Every(3), 6) == [3, 6]
    assert due(_Every(3, at_end=False), 7) == [3, 6]
    assert due(_Every(None), 7) == [7]


def _trees(first: int, n: int):
    return [make_tree(first + i, turns=1 + i % 2) for i in range(n)]


def _write(path: pathlib.Path, trees) -> str:
    path.write_text("".join(tree.model_dump_json() + "\n" for tree in trees))
    return str(path)


def _tensorboard_scalars(log_dir: pathlib.Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the scalars in the TensorBoard event files (TFRecords of Event protos) of `log_dir`."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])  # after length and its CRC
            pos += 12 + length + 4  # and the data's CRC
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


@pytest.fixture(scope="module")
def files(tmp_path_factory, smollm2_tokenizer):
    """(tiny model folder, 8 training trees, 5 held-out trees unlike them)."""
    root = tmp_path_factory.mktemp("hooks")
    held_out = _trees(100, 5)
    return (make_model_dir(root / "model", smollm2_tokenizer), _write(root / "train.jsonl", _trees(0, 8)),
            _write(root / "held_out.jsonl", held_out), held_out)


class _Recorder(Hook):
    """Records the step it is called at and the state's own step count; logs the step as custom/step."""

    def __init__(self, every: int):
        super().__init__(every, at_end=False)
        self.calls: list[tuple[int, int]] = []

    def __call__(self, trainer, step, state):
        self.calls.append((step, int(state.step)))
        return {"custom/step": float(step)}


def _train(tmp_path, files, hooks=(), **extra) -> tuple[pathlib.Path, dict, dict]:
    """Run 4 steps with the held-out hook every 3 steps (and `hooks`) and a checkpoint after every step; returns
    (run folder, {step: eval JSONL record}, TensorBoard scalars)."""
    model, train, held_out, _ = files
    out = tmp_path / "run"
    cfg = TrainConfig.model_validate({
        "model": {"path": model, "dtype": "float32"}, "output_dir": str(out), "batch_size": ROWS,
        "mesh": {"data": 2, "fsdp": 1, "tensor": -1}, "optim": {"lr": 3e-3, "warmup_steps": 1},
        "data": {"path": train, "seq_len": SEQ_LEN, "max_pairs": MAX_PAIRS},
        "checkpoint": {"every_steps": 1, "max_to_keep": None}, "log": {"progress_bar": False},
        **extra, "eval_data": {"path": held_out, "every": 3, **extra.get("eval_data", {})}})
    run(cfg, hooks)
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # training lines are unchanged
    evals = {r["step"]: r for r in records if "eval/loss" in r}
    return out, evals, _tensorboard_scalars(out / "logs")


def _params_at(run_dir: pathlib.Path, step: int):
    graphdef, params = nnx.split(load_model(str(run_dir / "checkpoints" / str(step)))[0])
    return graphdef, params


def _held_out_batch(tokenizer, trees, rejected_branches: bool) -> dict:
    """All `trees` packed as the trainer packs them, in one batch (no micro-batches, no mesh)."""
    packed = [pack_tree(tokenizer, tree, SEQ_LEN, rejected_branches) for tree in trees]
    return {k: jnp.asarray(v) for k, v in collate(packed, len(packed), SEQ_LEN, MAX_PAIRS,
                                                  tokenizer.pad_token_id).items()}


def test_held_out_sft_loss_is_logged_at_its_steps_and_equals_the_nll_of_the_held_out_trees(tmp_path, files,
                                                                                           smollm2_tokenizer):
    recorder = _Recorder(every=2)
    out, evals, scalars = _train(tmp_path, files, hooks=[recorder])
    assert sorted(evals) == [3, 4]  # every 3 steps, and after the last
    assert recorder.calls == [(2, 2), (4, 4)]  # a hook of the caller, after the step it is due, with that state
    assert scalars["custom/step"] == {2: 2.0, 4: 4.0}
    assert sorted(scalars["eval/loss"]) == [3, 4] and sorted(scalars["train/loss"]) == [1, 2, 3, 4]
    b = _held_out_batch(smollm2_tokenizer, files[3], rejected_branches=False)
    for step in (3, 4):
        graphdef, params = _params_at(out, step)
        logits, _ = nnx.merge(graphdef, params)(b["tokens"], b["positions"],
                                                packed_attention_mask(b["segment"], b["visible_prefix"]))
        logps = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), b["labels"][..., None], axis=-1)[..., 0]
        nll = float(-jnp.sum(logps * b["sft_weight"]) / jnp.sum(b["sft_weight"]))
        assert evals[step]["eval/loss"] == pytest.approx(nll, rel=1e-5)
        assert scalars["eval/loss"][step] == pytest.approx(nll, rel=1e-5)
        assert evals[step]["eval/targets"] == float(b["sft_weight"].sum())
    assert evals[4]["eval/loss"] != evals[3]["eval/loss"]  # the params moved between the two


def test_held_out_dpo_loss_and_metrics_equal_the_objective_on_the_first_batches(tmp_path, files, smollm2_tokenizer):
    """With `eval_data.batches: 2` only the first 2 batches (4 of the 5 trees, unshuffled) count; the reference is the
    starting model."""
    out, evals, scalars = _train(tmp_path, files, objective="dpo", dpo={"beta": 0.5},
                                 eval_data={"batches": 2})
    assert sorted(evals) == [3, 4]
    b = _held_out_batch(smollm2_tokenizer, files[3][:4], rejected_branches=True)
    graphdef, ref_params = nnx.split(load_model(files[0])[0])
    objective = DPO(DPOConfig(beta=0.5))
    for step in (3, 4):
        _, params = _params_at(out, step)
        loss, sums = objective.loss_sums(graphdef, params, ref_params, b)
        pairs = float(sums["weight"])
        assert pairs == float(b["pair_weight"].sum()) == evals[step]["eval/targets"]
        assert evals[step]["eval/loss"] == pytest.approx(float(loss) / pairs, rel=1e-5)
        assert abs(evals[step]["eval/loss"] - np.log(2)) > 1e-4  # not the loss at the reference point
        for name in ("reward_accuracy", "chosen_reward", "rejected_reward", "reward_margin"):
            assert evals[step][f"eval/{name}"] == pytest.approx(float(sums[name]) / pairs, rel=1e-4, abs=1e-6)
            assert scalars[f"eval/{name}"][step] == pytest.approx(evals[step][f"eval/{name}"], rel=1e-5, abs=1e-6)
