"""The trainer: exact gradient accumulation, mesh-invariant losses, DPO losses at the reference point, the optimizer's
schedule and decay mask, and checkpoints (local and gs://) that restore onto another mesh and load as models."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from aloe_jax.train.inputs.batch import collate
from aloe_jax.train.inputs.packing import pack_tree, packed_attention_mask
from aloe_jax.train.inputs.pipeline import DataConfig, global_batch
from aloe_jax.models import sharding
from aloe_jax.models.config import config_from_hf
from aloe_jax.models.decoder import Decoder, RuntimeOptions
from aloe_jax.models.tokenizer import encode_chat
from aloe_jax.train import optim
from aloe_jax.models.run_folder import write_run_files
from aloe_jax.train.checkpoint import Checkpointer
from aloe_jax.train.config import DPOConfig, OptimConfig, TrainConfig
from aloe_jax.train.objectives import DPO, OBJECTIVES, SFT
from aloe_jax.train.step import StepContext, make_grad_fn
from aloe_jax.train.trainer import Trainer
from tests.test_packing import make_tree

VOCAB = 256  # token ids of the real tokenizer are folded into this tiny vocabulary: the maths does not care
SEQ = 192


def tiny_cfg(dtype="float32"):
    return config_from_hf(dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               tie_word_embeddings=True), dtype=dtype)


def tiny_model(mesh, seed=0, **kw):
    # Blockwise attention over 64-token blocks (3 per 192-token row): every trainer test runs the training kernel.
    options = RuntimeOptions(remat=kw.pop("remat", False), scan_layers=kw.pop("scan", False), attention="blockwise",
                             attention_block=64)
    model = Decoder(tiny_cfg(**kw), nnx.Rngs(seed), options)
    return sharding.shard_model(model, mesh)


def mesh_of(data, fsdp, tensor):
    return sharding.make_mesh(sharding.MeshConfig(data=data, fsdp=fsdp, tensor=tensor),
                              devices=jax.devices()[:data * fsdp * tensor])


def batch_trees(b: int):
    """The 8 trees of host batch `b`, 1 to 3 turns each."""
    return [make_tree(10 * b + i, turns=1 + (i % 3)) for i in range(8)]


@pytest.fixture(scope="module")
def batches(smollm2_tokenizer):
    """Three host batches of 8 packed trees of different lengths (so micro-batches hold unequal target counts)."""
    out = []
    for b in range(3):
        trees = [pack_tree(smollm2_tokenizer, tree, SEQ) for tree in batch_trees(b)]
        batch = collate(trees, 8, SEQ, 3)
        batch["tokens"] %= VOCAB
        batch["labels"] %= VOCAB
        out.append(batch)
    return out


def jit_grad_fn(graphdef, objective, micro_batches, mesh):
    """The step's `grad_fn` for `objective`, jit-compiled."""
    return jax.jit(make_grad_fn(StepContext(graphdef, objective, micro_batches, mesh)))


def train_config(tmp_path, **kw):
    return TrainConfig(output_dir=str(tmp_path), data=DataConfig(path="unused.jsonl", seq_len=SEQ, max_pairs=3),
                       batch_size=8, optim=OptimConfig(lr=3e-3, warmup_steps=1), **kw)


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_accumulating_4_micro_batches_equals_one_4x_batch(batches, objective):
    mesh = mesh_of(2, 1, 1)
    model = tiny_model(mesh)
    graphdef, params = nnx.split(model)
    ref = jax.tree.map(lambda p: p + 0.01 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)  # ≠ policy
    batch = global_batch(batches[0], mesh)
    grads, metrics = {}, {}
    for micro in (1, 4):
        fn = jit_grad_fn(graphdef, OBJECTIVES[objective](), micro, mesh)
        grads[micro], metrics[micro] = fn(params, ref if objective == "dpo" else None, batch)
    big, accumulated = jax.tree.leaves(grads[1]), jax.tree.leaves(grads[4])
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(big, accumulated)) <= 1e-5
    assert abs(float(metrics[1]["loss"]) - float(metrics[4]["loss"])) <= 1e-5
    assert float(metrics[1]["targets"]) == float(metrics[4]["targets"]) > 0
    # The test can fail: averaging per-micro-batch means (normalising too early) gives a different gradient.
    one_pass = jit_grad_fn(graphdef, OBJECTIVES[objective](), 1, mesh)
    per_micro = [one_pass(params, ref if objective == "dpo" else None, jax.tree.map(lambda x: x[m::4], batch))[0]
                 for m in range(4)]
    early = jax.tree.map(lambda *g: sum(g) / 4, *per_micro)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(big, jax.tree.leaves(early))) > 1e-4


def test_accumulated_gradient_is_the_gradient_of_the_batch_mean_loss(batches):
    """The gradient a step applies is jax.grad of the whole batch's mean target NLL, written out here from the logits:
    the accumulated loss sums are divided by the batch's target count (a bare sum would scale every update with the
    batch's number of targets)."""
    mesh = mesh_of(2, 1, 1)
    graphdef, params = nnx.split(tiny_model(mesh))
    host = batches[0]
    grad_fn = jit_grad_fn(graphdef, SFT(), 2, mesh)
    grads, metrics = grad_fn(params, None, global_batch(host, mesh))
    b = {name: jnp.asarray(value) for name, value in host.items()}

    def mean_nll(p):
        mask = packed_attention_mask(b["segment"], b["visible_prefix"])
        logits, _ = nnx.merge(graphdef, p)(b["tokens"], b["positions"], mask)
        logps = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), b["labels"][..., None], axis=-1)[..., 0]
        return -jnp.sum(logps * b["sft_weight"]) / jnp.sum(b["sft_weight"])

    loss, want = jax.jit(jax.value_and_grad(mean_nll))(params)
    assert abs(float(metrics["loss"]) - float(loss)) <= 1e-5
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-6)


def _losses(batches, mesh_shape, objective, tmp_path, steps=5, scan=False):
    mesh = mesh_of(*mesh_shape)
    cfg = train_config(tmp_path, objective=objective, micro_batches=1)
    trainer = Trainer(cfg, tiny_model(mesh, scan=scan), mesh, total_steps=steps)
    state = trainer.init_state()
    out = []
    for i in range(steps):
        state, metrics = trainer.step(state, global_batch(batches[i % len(batches)], mesh))
        out.append(float(metrics["loss"]))
    return out


def test_sft_loss_trajectory_agrees_across_meshes(batches, tmp_path):
    reference = _losses(batches, (1, 1, 1), "sft", tmp_path)
    assert reference[-1] < reference[0] - 0.05  # it trains
    for shape, scan in [((8, 1, 1), False), ((2, 2, 2), False), ((1, 4, 2), False), ((2, 2, 2), True)]:
        np.testing.assert_allclose(_losses(batches, shape, "sft", tmp_path, scan=scan), reference, rtol=2e-5,
                                   err_msg=str((shape, scan)))


def test_dpo_loss_trajectory_agrees_across_meshes(batches, tmp_path):
    reference = _losses(batches, (1, 1, 1), "dpo", tmp_path)
    assert abs(reference[0] - np.log(2)) < 1e-5  # policy == reference at step 0: σ(0) for every pair
    assert reference[-1] < reference[0]
    for scan in (False, True):  # stacked layers under lax.scan on the sharded mesh give the same trajectory
        np.testing.assert_allclose(_losses(batches, (2, 2, 2), "dpo", tmp_path, scan=scan), reference, rtol=2e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("loss_type, at_reference", [("sigmoid", np.log(2)), ("ipo", (1 / (2 * 0.5)) ** 2),
                                                     ("hinge", 1.0)])
def test_dpo_losses_at_the_reference_point_and_metrics(batches, loss_type, at_reference):
    mesh = mesh_of(1, 1, 1)
    graphdef, params = nnx.split(tiny_model(mesh))
    fn = jit_grad_fn(graphdef, DPO(DPOConfig(beta=0.5, loss_type=loss_type)), 1, mesh)
    batch = global_batch(batches[1], mesh)
    _, metrics = fn(params, params, batch)
    assert abs(float(metrics["loss"]) - at_reference) < 1e-5
    assert float(metrics["targets"]) == float(batches[1]["pair_weight"].sum())
    for name in ("chosen_reward", "rejected_reward", "reward_margin"):
        assert abs(float(metrics[name])) < 1e-5


@nnx.jit
def _causal_token_logps(model, tokens, valid):
    """`[rows, seq - 1]` log p(tokens[:, t + 1]) of a plain causal forward over right-padded rows."""
    n = tokens.shape[1]
    mask = jnp.tril(jnp.ones((n, n), bool))[None] & valid[:, None, :]
    logits, _ = model(tokens, jnp.broadcast_to(jnp.arange(n), tokens.shape), mask)
    logps = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logps, tokens[:, 1:, None], axis=-1)[..., 0]


def _naive_pair_logps(model, tokenizer, trees) -> np.ndarray:
    """`[judged pairs, 2]` (chosen, rejected) summed log-probs, each reply scored alone after its full history by a
    plain causal forward (no packing, no pair gathering), token ids folded into VOCAB as in `batches`."""
    rows, targets = [], []
    for tree in trees:
        for turn, t in enumerate(tree.turns):
            if not t.judged:
                continue
            for kind in ("preferred", "rejected"):
                reply = {"role": "assistant", "content": t.reply(kind)}
                ids, mask = encode_chat(tokenizer, tree.history(turn) + [reply])
                start = max(i for i in range(1, len(ids)) if mask[i] and not mask[i - 1])  # the last reply's span
                rows.append([i % VOCAB for i in ids])
                targets.append([i for i in range(start, len(ids)) if mask[i]])
    tokens = np.zeros((len(rows), SEQ), np.int32)
    valid = np.zeros((len(rows), SEQ), bool)
    for r, ids in enumerate(rows):
        tokens[r, :len(ids)], valid[r, :len(ids)] = ids, True
    logps = np.asarray(_causal_token_logps(model, jnp.asarray(tokens), jnp.asarray(valid)))
    return np.asarray([logps[r, np.asarray(t) - 1].sum() for r, t in enumerate(targets)]).reshape(-1, 2)


def test_dpo_steps_raise_every_pairs_margin_and_the_accuracy_against_the_reference_is_1(batches, tmp_path,
                                                                                         smollm2_tokenizer):
    """A few Trainer DPO steps from policy = reference raise (chosen − rejected) of the policy over the reference's on
    every pair, measured by scoring each reply alone; against that reference — worse on every chosen reply, relative
    to its rejected one — the step reports reward accuracy 1 and the same mean margin. Trained backwards (chosen and
    rejected swapped anywhere in the objective) the margins fall instead."""
    trees = batch_trees(0)
    assert all(pack_tree(smollm2_tokenizer, tree, SEQ).turns_cut == 0 for tree in trees)  # every pair is trained
    mesh = mesh_of(1, 1, 1)
    cfg = train_config(tmp_path, objective="dpo")
    trainer = Trainer(cfg, tiny_model(mesh), mesh, total_steps=8)
    state = trainer.init_state()
    batch = global_batch(batches[0], mesh)
    losses = []
    for _ in range(8):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1
    reference = _naive_pair_logps(nnx.merge(trainer.graphdef, trainer.ref_params), smollm2_tokenizer, trees)
    policy = _naive_pair_logps(nnx.merge(trainer.graphdef, state.params), smollm2_tokenizer, trees)
    margins = (policy[:, 0] - policy[:, 1]) - (reference[:, 0] - reference[:, 1])  # [pairs]
    assert len(margins) == float(batches[0]["pair_weight"].sum()) and (margins > 0).all(), margins
    _, metrics = jit_grad_fn(trainer.graphdef, trainer.objective, 1, mesh)(state.params, trainer.ref_params, batch)
    assert float(metrics["reward_accuracy"]) == 1.0
    np.testing.assert_allclose(float(metrics["reward_margin"]), cfg.dpo.beta * margins.mean(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(float(metrics["chosen_reward"]),
                               cfg.dpo.beta * (policy[:, 0] - reference[:, 0]).mean(), rtol=1e-3, atol=1e-4)


def test_dpo_reference_stays_frozen_and_remat_and_bf16_compute_keep_the_numbers(batches, tmp_path):
    mesh = mesh_of(2, 1, 1)
    cfg = train_config(tmp_path, objective="dpo")
    trainer = Trainer(cfg, tiny_model(mesh), mesh, total_steps=2)
    ref_before = jax.tree.map(np.asarray, trainer.ref_params)
    state = trainer.init_state()
    for i in range(2):
        state, _ = trainer.step(state, global_batch(batches[i], mesh))
    for a, b in zip(jax.tree.leaves(ref_before), jax.tree.leaves(trainer.ref_params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert any(float(jnp.max(jnp.abs(a - b))) > 0 for a, b in zip(jax.tree.leaves(ref_before),
                                                                 jax.tree.leaves(state.params)))
    # Remat recomputes activations: same gradients. bf16 compute: master weights stay fp32, loss close to fp32.
    batch = global_batch(batches[0], mesh)
    results = {}
    for name, kw in {"fp32": {}, "remat": {"remat": True}, "bf16": {"dtype": "bfloat16"}}.items():
        graphdef, params = nnx.split(tiny_model(mesh, **kw))
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
        results[name] = jit_grad_fn(graphdef, SFT(), 2, mesh)(params, None, batch)
    for a, b in zip(jax.tree.leaves(results["fp32"][0]), jax.tree.leaves(results["remat"][0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert abs(float(results["bf16"][1]["loss"]) - float(results["fp32"][1]["loss"])) < 0.05
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(results["bf16"][0]))


def test_schedule_warms_up_then_decays_and_weight_decay_skips_vectors():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="linear", min_lr_ratio=0.1, weight_decay=0.5, clip_norm=0)
    schedule = optim.learning_rate_schedule(cfg, total_steps=14)
    assert [float(schedule(s)) for s in (0, 2, 4)] == pytest.approx([0.0, 0.5, 1.0])
    assert float(schedule(9)) == pytest.approx(0.55)  # halfway through the decay from 1.0 to 0.1
    assert float(schedule(14)) == pytest.approx(0.1)
    cosine = optim.learning_rate_schedule(cfg.model_copy(update={"schedule": "cosine"}), total_steps=14)
    assert float(cosine(9)) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine at its midpoint is the mean of the ends
    constant = optim.learning_rate_schedule(cfg.model_copy(update={"schedule": "constant"}), total_steps=14)
    assert [float(constant(s)) for s in (0, 2, 4, 13)] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    no_warmup = optim.learning_rate_schedule(cfg.model_copy(update={"schedule": "constant", "warmup_steps": 0}), 14)
    assert [float(no_warmup(s)) for s in (0, 7)] == pytest.approx([1.0, 1.0])  # trains from the first step
    # Zero gradients: only weight decay moves parameters, and only the matrices.
    params = {"matrix": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
    tx = optim.make_optimizer(cfg, total_steps=14)
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
        params = optax.apply_updates(params, updates)
    assert float(params["scale"][0]) == 1.0
    assert float(params["matrix"][0, 0]) == pytest.approx((1 - 0.5 * 0.25) * (1 - 0.5 * 0.5))  # lr 0.25, 0.5 (0 first)
    # Clipping: a huge gradient enters the optimizer with global norm clip_norm.
    clipped = optim.make_optimizer(cfg.model_copy(update={"clip_norm": 1.0, "weight_decay": 0.0}), 14)
    huge = {"matrix": jnp.full((2, 2), 1e6), "scale": jnp.full((2,), 1e6)}
    s = clipped.init(params)
    _, s = clipped.update(huge, s, params)
    mu = optax.tree_utils.tree_get(s, "mu")  # first moments hold (1 - b1) · the clipped gradient
    assert float(optax.global_norm(mu)) == pytest.approx(0.1, rel=1e-4)


def _saved_state_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_restores_onto_another_mesh_with_data_position_and_loads_as_a_model(batches, tmp_path,
                                                                                    smollm2_tokenizer):
    import grain

    from aloe_jax.models.loader import load_model

    run_dir = str(tmp_path / "run")
    mesh = mesh_of(2, 2, 2)
    cfg = train_config(tmp_path, objective="sft", micro_batches=2)
    trainer = Trainer(cfg, tiny_model(mesh), mesh, total_steps=3)
    state = trainer.init_state()
    data = iter(grain.MapDataset.source(list(range(10))).to_iter_dataset())
    checkpointer = Checkpointer(run_dir, max_to_keep=2)
    write_run_files(run_dir, "sft", "tiny", tiny_cfg(), smollm2_tokenizer)
    saved_params = {}
    for i in range(3):
        state, _ = trainer.step(state, global_batch(batches[i], mesh))
        next(data)
        checkpointer.save(state, data, {"note": "test"})
        saved_params[i + 1] = np.asarray(state.params["embed"][...])
    checkpointer.wait()
    assert checkpointer.manager.all_steps() == [2, 3]  # max_to_keep pruned step 1
    saved = jax.tree.map(np.asarray, state)

    # Restore onto a 1×4×2 mesh: a fresh trainer's abstract state carries that mesh's shardings.
    other_mesh = mesh_of(1, 4, 2)
    other = Trainer(cfg, tiny_model(other_mesh, seed=1), other_mesh, total_steps=3)
    resumed_data = iter(grain.MapDataset.source(list(range(10))).to_iter_dataset())
    restored = Checkpointer(run_dir).restore(3, other.abstract_state, resumed_data)
    _saved_state_equal(saved, restored)
    assert next(resumed_data) == 3  # the data iterator continues after the 3 items consumed
    assert jax.tree.leaves(restored.params)[0].sharding.mesh.shape == other_mesh.shape

    # The run folder is a model: the latest step by default, or a chosen step's folder; with its tokenizer.
    model, tokenizer = load_model(run_dir)
    _saved_state_equal(saved.params, nnx.state(model, nnx.Param))
    assert tokenizer.encode("hello world") == smollm2_tokenizer.encode("hello world")
    older, _ = load_model(str(tmp_path / "run" / "checkpoints" / "2"))
    np.testing.assert_array_equal(np.asarray(nnx.state(older, nnx.Param)["embed"][...]), saved_params[2])
    assert not np.array_equal(saved_params[2], saved_params[3])


def test_checkpoint_on_gcs_saves_prunes_and_loads(batches, gcs_emulator, tmp_path, smollm2_tokenizer):
    from aloe_jax.core import storage
    from aloe_jax.models.loader import load_model

    run_dir = f"{gcs_emulator}/trainer-run"
    mesh = mesh_of(1, 1, 1)  # few shards: the emulator is slow per object
    trainer = Trainer(train_config(tmp_path, objective="sft"), tiny_model(mesh), mesh, total_steps=2)
    state = trainer.init_state()
    checkpointer = Checkpointer(run_dir, max_to_keep=1)
    write_run_files(run_dir, "sft", "tiny", tiny_cfg(), smollm2_tokenizer)
    for i in range(2):
        state, _ = trainer.step(state, global_batch(batches[i], mesh))
        checkpointer.save(state, None, {"note": "gcs"})
    checkpointer.wait()
    assert checkpointer.manager.all_steps() == [2]
    assert storage.list_dir(f"{run_dir}/checkpoints") == ["2"]
    restored = Checkpointer(run_dir).restore(2, trainer.abstract_state, None)
    _saved_state_equal(jax.tree.map(np.asarray, state), restored)
    model, _ = load_model(run_dir)
    _saved_state_equal(state.params, nnx.state(model, nnx.Param))
    info = json.loads(storage.read_text(f"{run_dir}/aloe_run.json"))
    assert info["objective"] == "sft" and info["base_model"] == "tiny"
