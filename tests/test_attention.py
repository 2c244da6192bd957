"""Memory-efficient training paths change no number: blockwise attention == dense attention (forward and gradient,
every family, packed trees with side branches and padding); every objective × remat policy × compute dtype ×
layer layout gives the gradients of the plain path; chunked label log-probs == whole; stacked layers round-trip
through loading and checkpoints."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aloe_jax.train.inputs.batch import collate
from aloe_jax.train.inputs.packing import pack_tree
from aloe_jax.models import sharding
from aloe_jax.models.attention import TreeMask, blockwise_attention, dense_attention, dense_tree_mask
from aloe_jax.models.config import config_from_hf, read_hf_config
from aloe_jax.models.decoder import Decoder, RuntimeOptions, stack_layers, unstack_layers
from aloe_jax.models.loader import load_model, relayout
from aloe_jax.models.weights import load_hf_model
from aloe_jax.train.config import DPOConfig
from aloe_jax.train.objectives import DPO, GRPO, SFT
from aloe_jax.train.step import StepContext, make_grad_fn
from tests import tiny_models
from tests.test_packing import make_tree

VOCAB = 160  # the tiny models' vocabulary: real token ids are folded into it (the maths does not care)


@pytest.fixture(scope="module")
def tree_batch(smollm2_tokenizer):
    """Three packed rows of different lengths (spine + side branches) and one all-padding row, 160 tokens each."""
    trees = [pack_tree(smollm2_tokenizer, make_tree(seed, turns=turns), 160) for seed, turns in ((1, 3), (2, 2), (3, 1))]
    batch = collate(trees + [None], 4, 160, 3)
    assert (batch["segment"] > 0).any() and (batch["segment"] < 0).any()  # side branches and padding are present
    batch["tokens"] %= VOCAB
    batch["labels"] %= VOCAB
    return {k: jnp.asarray(v) for k, v in batch.items()}


def test_blockwise_kernel_equals_dense_on_tree_masks_forward_and_gradient():
    rng = np.random.default_rng(0)
    b, t, h, kv, hd = 2, 52, 6, 2, 8
    q, k, v, weight = (jnp.asarray(rng.normal(size=s), jnp.float32)
                       for s in ((b, t, h, hd), (b, kv, t, hd), (b, kv, t, hd), (b, t, h, hd)))
    segment = np.zeros((b, t), np.int32)
    prefix = np.zeros((b, t), np.int32)
    segment[0, 30:38], prefix[0, 30:38] = 1, 12  # a branch seeing 12 spine tokens
    segment[0, 38:45], prefix[0, 38:45] = 2, 25
    segment[0, 45:] = -1  # padding
    segment[1, 20:] = -1
    mask = TreeMask(jnp.asarray(segment), jnp.asarray(prefix))
    real = jnp.asarray(segment >= 0)[:, :, None, None]
    weight = weight * real  # padding queries see nothing: their output is never used

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weight)

    dense = lambda q, k, v: dense_attention(q, k, v, dense_tree_mask(mask))  # noqa: E731
    want, want_grads = dense(q, k, v) * real, jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
    for block in (8, 16, 52, 64):  # several blocks (with padding to a multiple), one block, a block > T
        blockwise = lambda q, k, v: blockwise_attention(q, k, v, mask, block)  # noqa: E731
        got = jax.jit(blockwise)(q, k, v) * real
        assert float(jnp.max(jnp.abs(got - want))) <= 1e-5, block
        grads = jax.jit(jax.grad(loss(blockwise), argnums=(0, 1, 2)))(q, k, v)
        for name, g, w in zip("qkv", grads, want_grads):
            assert float(jnp.max(jnp.abs(g - w))) <= 1e-5, (block, name)
    # The test can fail: a kernel that lets a branch see the whole spine is far off.
    leaky = TreeMask(mask.segment, jnp.where(mask.segment > 0, 45, 0))
    assert float(jnp.max(jnp.abs(blockwise_attention(q, k, v, leaky, 8) * real - want))) > 1e-2


def _load(folder, options=RuntimeOptions()):
    return relayout(load_hf_model(str(folder), read_hf_config(str(folder))), options)


def _packed_loss_and_grads(model, batch):
    mask = TreeMask(batch["segment"], batch["visible_prefix"])

    def loss(params):
        m = nnx.merge(graphdef, params)
        hidden, _ = m.hidden_states(batch["tokens"], batch["positions"], mask)
        logps = m.label_logprobs(hidden, batch["labels"])
        return jnp.sum(logps * batch["sft_weight"]), logps

    graphdef, params = nnx.split(model)
    (value, logps), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, logps * (batch["segment"] >= 0), grads


@pytest.mark.parametrize("family", list(tiny_models.FAMILIES))
def test_blockwise_attention_and_chunked_logprobs_equal_dense_for_every_family(family, tiny_model_dirs, tree_batch):
    dense_model = _load(tiny_model_dirs[family], RuntimeOptions(attention="dense"))
    fast_model = relayout(dense_model, RuntimeOptions(attention="blockwise", attention_block=32, logits_chunk=48))
    want_loss, want_logps, want_grads = _packed_loss_and_grads(dense_model, tree_batch)
    loss, logps, grads = _packed_loss_and_grads(fast_model, tree_batch)
    assert abs(float(loss - want_loss)) <= 1e-5 * max(1.0, abs(float(want_loss)))
    assert float(jnp.max(jnp.abs(logps - want_logps))) <= 1e-5
    # Gradients of a sum over ~200 target tokens reach ~70: 1e-5 of their scale (fp32 sums in another order).
    scale = max(1.0, max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want_grads)))
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        assert float(jnp.max(jnp.abs(g - w))) <= 1e-5 * scale


def _tiny_cfg(dtype):
    return config_from_hf(dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               tie_word_embeddings=True), dtype=dtype)


OBJECTIVES = [("sft", None), ("dpo", "sigmoid"), ("dpo", "ipo"), ("dpo", "hinge"), ("grpo", None)]


def _with_grpo_fields(batch: dict) -> dict:
    """The packed trees' replies as GRPO candidates: advantages of both signs, every reply weighted, and rollout-time
    log-probs around −3 so that ratios leave the clip range both ways."""
    rows, seq = batch["tokens"].shape
    replies = 2 * batch["pair_chosen"].shape[1]
    wave = lambda n, phase: jnp.sin(phase + jnp.arange(n, dtype=jnp.float32))  # noqa: E731
    return {**batch, "reply_advantage": wave(rows * replies, 0.0).reshape(rows, replies),
            "reply_weight": jnp.ones((rows, replies), jnp.float32),
            "old_logprobs": (-3.0 + 2.0 * wave(rows * seq, 1.0)).reshape(rows, seq)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("objective,loss_type", OBJECTIVES)
def test_every_objective_remat_dtype_and_layout_gives_the_plain_gradients(objective, loss_type, dtype, tree_batch):
    """Each combination a config can select (objective × remat × compute dtype × scan_layers × attention) against
    the plain path (no remat, unrolled, dense): fp32 ≤ 1e-6; bf16 within bf16 rounding of the plain bf16 result."""
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
    dpo = DPO(DPOConfig(loss_type=loss_type)) if objective == "dpo" else GRPO() if objective == "grpo" else None
    if objective == "grpo":
        tree_batch = _with_grpo_fields(tree_batch)
    plain = Decoder(_tiny_cfg(dtype), nnx.Rngs(0), RuntimeOptions(attention="dense"))
    graphdef, params = nnx.split(plain)
    # A reference unlike the policy, so that DPO's gradient (and GRPO's KL) is not the degenerate one at the reference.
    ref = jax.tree.map(lambda p: p + 0.02 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)

    def grads_of(options):
        model = relayout(nnx.merge(graphdef, params), options)
        g, p = nnx.split(model)
        r = nnx.state(relayout(nnx.merge(graphdef, ref), options)) if dpo else None
        grads, metrics = jax.jit(make_grad_fn(StepContext(g, dpo or SFT(), 2, mesh)))(p, r, tree_batch)
        return (unstack_layers(grads) if options.scan_layers else grads), metrics

    want, want_metrics = grads_of(RuntimeOptions(attention="dense"))
    assert float(want_metrics["loss"]) > 0 and float(want_metrics["targets"]) > 0
    tolerance = 1e-6 if dtype == "float32" else 2e-2
    # Every remat policy, half of them with stacked layers + blockwise attention + chunked log-probs (each
    # compile costs seconds on 2 cores; the layout does not interact with the policy beyond where it applies).
    for remat, scan in (("none", True), ("full", False), ("dots", True), ("dots_no_batch", False)):
        options = RuntimeOptions(remat=remat, scan_layers=scan, attention="blockwise" if scan else "dense",
                                 attention_block=64, logits_chunk=64 if scan else 0)
        grads, metrics = grads_of(options)
        scale = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want))
        worst = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))))
                    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)))
        limit = tolerance if dtype == "float32" else tolerance * scale
        # Blockwise attention and chunks reorder fp32 sums: allow their rounding, not a different gradient.
        assert worst <= (limit if not scan or dtype != "float32" else 1e-5 * max(1.0, scale)), \
            (remat, scan, worst)
        assert abs(float(metrics["loss"]) - float(want_metrics["loss"])) <= (1e-5 if dtype == "float32" else 2e-2)


def test_stacked_layers_round_trip_and_checkpoint_of_a_scan_run_loads_unrolled(tiny_model_dirs, tree_batch, tmp_path,
                                                                               smollm2_tokenizer):
    from aloe_jax.models.run_folder import write_run_files
    from aloe_jax.train.checkpoint import Checkpointer
    from aloe_jax.train.step import TrainState
    import optax

    folder = str(tiny_model_dirs["qwen2"])
    unrolled, tokenizer = _load(folder), smollm2_tokenizer
    scanned = _load(folder, RuntimeOptions(scan_layers=True))
    flat = dict(nnx.to_flat_state(nnx.state(scanned)))
    assert flat[("layers", "attn", "q")][...].shape[0] == unrolled.cfg.num_layers
    assert flat[("layers", "attn", "q")].get_metadata()["logical_axes"][0] == "layers"
    back = unstack_layers(stack_layers(nnx.state(unrolled), unrolled.cfg.num_layers))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(nnx.state(unrolled))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    want = _packed_loss_and_grads(unrolled, tree_batch)[1]
    assert float(jnp.max(jnp.abs(_packed_loss_and_grads(scanned, tree_batch)[1] - want))) <= 1e-5

    # A scan run's checkpoint holds stacked layers; loading it as a model (eval, export, serve) gives them unrolled.
    run = str(tmp_path / "run")
    params = nnx.state(scanned)
    state = TrainState(jnp.zeros((), jnp.int32), params, optax.sgd(0.1).init(params), jax.random.PRNGKey(0))
    write_run_files(run, "sft", folder, scanned.cfg, tokenizer, scan_layers=True)
    checkpointer = Checkpointer(run)
    checkpointer.save(state, None, {})
    checkpointer.wait()
    checkpointer.close()
    loaded, _ = load_model(run)
    assert not loaded.options.scan_layers
    for a, b in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(nnx.state(unrolled))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="without a KV cache"):
        from aloe_jax.models.decoder import init_cache

        scanned(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1, 4), bool),
                init_cache(scanned.cfg, 1, 4), 0)


def test_remat_true_and_false_spell_full_and_none():
    assert RuntimeOptions(remat=True).remat == "full" and RuntimeOptions(remat=False).remat == "none"
    assert dataclasses.replace(RuntimeOptions(), remat=True).remat == "full"


@pytest.mark.parametrize("scan", [False, True])
def test_the_configured_kernel_and_remat_policy_are_what_runs(scan, tree_batch):
    """Memory options change no number, so the tests above cannot see them: check the traced program instead."""
    def program(options):
        model = Decoder(_tiny_cfg("float32"), nnx.Rngs(0), options)
        graphdef, params = nnx.split(model)
        mask = TreeMask(tree_batch["segment"], tree_batch["visible_prefix"])

        def loss(p):
            hidden, _ = nnx.merge(graphdef, p).hidden_states(tree_batch["tokens"], tree_batch["positions"], mask)
            return jnp.sum(hidden)
        return str(jax.make_jaxpr(loss)(params))  # the forward as traced: kernels and remat are primitives

    fast = program(RuntimeOptions(attention="blockwise", attention_block=64, remat="full", scan_layers=scan))
    plain = program(RuntimeOptions(attention="dense", scan_layers=scan))
    assert "custom_vjp_call" in fast and "custom_vjp_call" not in plain
    assert "remat2[" in fast and "remat2[" not in plain  # jax.checkpoint traces as remat2
    auto_short = program(RuntimeOptions(attention="auto", attention_block=512))  # 160 tokens: one block → dense
    assert "custom_vjp_call" not in auto_short


def test_resuming_a_run_with_the_other_layer_layout_is_one_clear_error(tmp_path, smollm2_tokenizer):
    from aloe_jax.train.inputs.pipeline import DataConfig
    from aloe_jax.core.errors import ConfigError
    from aloe_jax.models.run_folder import write_run_files
    from aloe_jax.train.config import TrainConfig
    from aloe_jax.train.trainer import run

    write_run_files(str(tmp_path), "sft", "tiny", _tiny_cfg("float32"), smollm2_tokenizer, scan_layers=True)
    cfg = TrainConfig(output_dir=str(tmp_path), data=DataConfig(path=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ConfigError, match="trained with scan_layers=true"):
        run(cfg)
