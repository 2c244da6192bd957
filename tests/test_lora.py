"""LoRA: adapters of the configured size on a frozen base (no optimizer state for it), SFT and DPO that train them,
DPO's reference as the base without the adapters (no copy of the weights), every layout / remat policy / dtype, and
checkpoints that resume, load merged, and export merged (transformers) or as a PEFT adapter folder (peft)."""

import jax
import jax.numpy as jnp
import numpy as np
import pydantic
import pytest
from flax import nnx

from aloe_jax.models import lora
from aloe_jax.models.decoder import Decoder, RuntimeOptions
from aloe_jax.models.run_folder import write_run_files
from aloe_jax.train.checkpoint import Checkpointer
from aloe_jax.train.config import OptimConfig, TrainConfig
from aloe_jax.train.inputs.pipeline import DataConfig, global_batch
from aloe_jax.train.trainer import Trainer
from tests.test_trainer import SEQ, VOCAB, batches, mesh_of, tiny_cfg  # noqa: F401 (batches: a fixture)

RANK, ALPHA = 4, 8.0
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]
STEPS = 3


def expected_trainable(rank: int, targets: list[str]) -> int:
    """rank · (in + out) per adapted projection and layer, from the tiny model's dimensions."""
    cfg = tiny_cfg()
    d, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    in_out = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
    return cfg.num_layers * sum(rank * (i + o) for i, o in (in_out[t] for t in targets))


def lora_config(tmp_path, objective: str, dropout: float = 0.0, targets=TARGETS) -> TrainConfig:
    return TrainConfig(objective=objective, output_dir=str(tmp_path),
                       data=DataConfig(path="unused.jsonl", seq_len=SEQ, max_pairs=3), batch_size=8,
                       optim=OptimConfig(lr=5e-2, warmup_steps=0, min_lr_ratio=1.0),  # a constant lr
                       lora=dict(rank=RANK, alpha=ALPHA, targets=targets, dropout=dropout))


def base_weights(params: nnx.State) -> dict:
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(params)
            if not isinstance(v, lora.LoraParam)}


def train(batches, tmp_path, objective: str, scan: bool, dtype: str, dropout: float = 0.0):
    """A LoRA run of STEPS steps on one device: (trainer, final state, losses, the starting base weights, the
    starting base exported as an HF folder)."""
    from aloe_jax.models.weights import export_hf

    mesh = mesh_of(1, 1, 1)
    model = Decoder(tiny_cfg(dtype), nnx.Rngs(0), RuntimeOptions(scan_layers=scan, attention="dense"))
    base_dir = tmp_path / "base"
    export_hf(model if not scan else _unrolled(model), tokenizer=None, out=str(base_dir))
    trainer = Trainer(lora_config(tmp_path, objective, dropout), model, mesh, total_steps=STEPS)
    state = trainer.init_state()
    start = base_weights(state.params)
    losses = []
    for i in range(STEPS):
        state, metrics = trainer.step(state, global_batch(batches[i % 2], mesh))
        losses.append(float(metrics["loss"]))
    return trainer, state, losses, start, base_dir


def _unrolled(model: Decoder) -> Decoder:
    from aloe_jax.models.loader import relayout

    return relayout(model, RuntimeOptions())


@pytest.fixture(scope="module", params=[(False, "float32", 0.0), (True, "bfloat16", 0.1)],
                ids=["unrolled-fp32", "scan-bf16-dropout"])
def sft_run(request, batches, tmp_path_factory):
    scan, dtype, dropout = request.param
    tmp = tmp_path_factory.mktemp("lora_sft")
    return (scan, tmp, *train(batches, tmp, "sft", scan, dtype, dropout))


@pytest.fixture(scope="module")
def dpo_run(batches, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_dpo")
    return train(batches, tmp, "dpo", scan=False, dtype="float32")


def _check_frozen_base_and_counts(trainer, state, start):
    assert trainer.num_trainable == expected_trainable(RANK, TARGETS)
    # Adam's two moments for the adapters only: no optimizer state for the base.
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moments == 2 * trainer.num_trainable
    after = base_weights(state.params)
    assert after.keys() == start.keys()
    for path in start:
        np.testing.assert_array_equal(after[path], start[path], err_msg=str(path))
    trained_b = [v[...] for p, v in nnx.to_flat_state(state.params) if str(p[-1]).endswith("_lora_b")]
    assert all(float(jnp.abs(b).max()) > 0 for b in trained_b)


@pytest.mark.slow
def test_sft_trains_only_the_adapters_of_the_configured_size(sft_run):
    _, _, trainer, state, losses, start, _ = sft_run
    _check_frozen_base_and_counts(trainer, state, start)
    assert losses[2] < losses[0] - 0.03, losses  # the same batch, two updates later


@pytest.mark.parametrize("scan", [False, True])
def test_adapters_are_sharded_like_their_weight_and_the_rank_is_not(scan):
    from aloe_jax.models import sharding

    model = nnx.eval_shape(lambda: lora.add_adapters(Decoder(tiny_cfg(), nnx.Rngs(0), RuntimeOptions(scan_layers=scan)),
                                                     lora.LoraConfig(rank=RANK), nnx.Rngs(0)))
    sharding_of = sharding.param_shardings(model, mesh_of(2, 2, 2))
    lead = () if not scan else (None,)  # the stacked "layers" axis is not sharded
    layer = ("layers",) if scan else ("layers", 0)
    specs = {name: tuple(sharding_of((*layer, parent, name)).spec) for parent, name in
             [("attn", "q_lora_a"), ("attn", "q_lora_b"), ("attn", "o_lora_a"), ("mlp", "down_lora_b")]}
    pad = lambda spec: spec + (None,) * (4 - len(spec))  # noqa: E731
    assert {k: pad(v) for k, v in specs.items()} == {
        "q_lora_a": pad((*lead, "fsdp", None)), "q_lora_b": pad((*lead, None, "tensor", None)),
        "o_lora_a": pad((*lead, "tensor", None, None)), "down_lora_b": pad((*lead, None, "fsdp"))}


def test_dpo_reference_is_the_base_without_the_adapters_and_no_copy_is_held(dpo_run):
    trainer, state, losses, start, _ = dpo_run
    assert trainer.ref_params is None  # lora on and dpo.reference unset: no second copy of the weights
    _check_frozen_base_and_counts(trainer, state, start)
    assert abs(losses[0] - np.log(2)) < 1e-5  # B = 0 at the start: policy = reference for every pair
    assert losses[-1] < losses[0] - 0.01, losses  # a reference that kept the adapters would pin it at log 2


def _logits(model: Decoder, tokens: np.ndarray) -> np.ndarray:
    t = tokens.shape[1]
    mask = jnp.tril(jnp.ones((1, t, t), bool))
    return np.asarray(model(jnp.asarray(tokens), jnp.arange(t)[None], mask)[0])


@pytest.mark.slow
def test_checkpoint_resumes_loads_merged_and_exports_merged_and_as_peft(sft_run, smollm2_tokenizer):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from aloe_jax.cli import main
    from aloe_jax.models.config import read_hf_config
    from aloe_jax.models.loader import load_model
    from aloe_jax.models.weights import load_hf_model

    scan, tmp, trainer, state, _, _, base_dir = sft_run
    run_dir = str(tmp / "run")
    write_run_files(run_dir, "sft", str(base_dir), tiny_cfg(), smollm2_tokenizer, scan_layers=scan,
                    lora=trainer.cfg.lora.model_dump(mode="json"))
    checkpointer = Checkpointer(run_dir)
    checkpointer.save(state, None, {})
    checkpointer.wait()
    restored = checkpointer.restore(STEPS, trainer.abstract_state, None)
    checkpointer.close()
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    tokens = (np.arange(24)[None] * 7 + 3) % VOCAB
    adapted, _ = load_model(run_dir, merge_lora=False)
    assert lora.config_of(adapted) == trainer.cfg.lora
    merged, _ = load_model(run_dir)
    assert lora.config_of(merged) is None
    ours = _logits(adapted, tokens)
    np.testing.assert_allclose(_logits(merged, tokens), ours, atol=1e-5)
    base_model = load_hf_model(str(base_dir), read_hf_config(str(base_dir)))
    assert np.abs(ours - _logits(base_model, tokens)).max() > 1e-3  # the adapters matter

    main(["export", run_dir, str(tmp / "merged"), "--dtype", "float32"])
    main(["export", run_dir, str(tmp / "adapter"), "--dtype", "float32", "--adapter"])
    torch_tokens = torch.tensor(tokens)
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(tmp / "merged", dtype=torch.float32).eval()
        assert np.abs(hf(torch_tokens).logits.numpy() - ours).max() <= 1e-4
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        with_adapter = peft.PeftModel.from_pretrained(base, tmp / "adapter").eval()
        assert np.abs(with_adapter(torch_tokens).logits.numpy() - ours).max() <= 1e-4


def _adapter_grads(remat: str, scan: bool) -> dict:
    """Gradients of a loss on the logits with respect to (nonzero) adapters, by unrolled-layout path."""
    from aloe_jax.models.loader import relayout

    model = Decoder(tiny_cfg(), nnx.Rngs(0), RuntimeOptions(attention="dense"))
    lora.add_adapters(model, lora.LoraConfig(rank=2, alpha=4.0, targets=["q", "o", "down"]), nnx.Rngs(1))
    # The same adapters in both layouts: stacked from the unrolled ones, not drawn again.
    model = relayout(model, RuntimeOptions(remat=remat, scan_layers=scan, attention="dense"))
    graphdef, params = nnx.split(model)
    params = nnx.from_flat_state([(p, v.replace(v[...] + 0.01) if isinstance(v, lora.LoraParam) else v)
                                  for p, v in nnx.to_flat_state(params)])
    trainable, frozen = nnx.split_state(params, lora.LoraParam, ...)
    tokens = jnp.arange(16)[None] % VOCAB

    def loss(t):
        return jnp.mean(_logits_traced(nnx.merge(graphdef, nnx.merge_state(t, frozen)), tokens) ** 2)

    grads = jax.jit(jax.grad(loss))(trainable)
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(_unstacked(grads, scan))}


@pytest.fixture(scope="module")
def reference_adapter_grads():
    return _adapter_grads("none", False)


@pytest.mark.parametrize("remat, scan", [("full", True), ("dots", False), ("dots_no_batch", True)])
def test_adapter_gradients_are_the_same_under_every_remat_policy_and_layout(remat, scan, reference_adapter_grads):
    reference = reference_adapter_grads
    got = _adapter_grads(remat, scan)
    assert got.keys() == reference.keys()
    for path in reference:
        np.testing.assert_allclose(got[path], reference[path], rtol=1e-4, atol=1e-7, err_msg=str(path))


def _logits_traced(model: Decoder, tokens: jax.Array) -> jax.Array:
    t = tokens.shape[1]
    return model(tokens, jnp.arange(t)[None], jnp.tril(jnp.ones((1, t, t), bool)))[0]


def _unstacked(state: nnx.State, scan: bool) -> nnx.State:
    from aloe_jax.models.decoder import unstack_layers

    return unstack_layers(state) if scan else state


def test_lora_config_names_the_decoders_projections():
    assert lora.LoraConfig().targets == TARGETS
    with pytest.raises(pydantic.ValidationError, match="lora.targets"):
        TrainConfig(lora=dict(targets=["q_proj"]))
    assert TrainConfig().lora is None


def test_resuming_with_another_lora_setting_is_one_line(tmp_path, smollm2_tokenizer):
    from aloe_jax.core.errors import ConfigError
    from aloe_jax.train.trainer import _check_resume_layout

    cfg = lora_config(tmp_path, "sft")
    write_run_files(str(tmp_path), "sft", "base", tiny_cfg(), smollm2_tokenizer, lora=cfg.lora.model_dump(mode="json"))
    _check_resume_layout(cfg)
    with pytest.raises(ConfigError, match="trained with lora="):
        _check_resume_layout(cfg.model_copy(update={"lora": None}))


def test_adapter_export_of_a_run_without_lora_is_one_line(tmp_path, smollm2_tokenizer, capsys):
    from aloe_jax.cli import main

    write_run_files(str(tmp_path), "sft", "base", tiny_cfg(), smollm2_tokenizer)
    assert main(["export", str(tmp_path), str(tmp_path / "out"), "--adapter"]) == 2
    assert "is not a LoRA run" in capsys.readouterr().err
