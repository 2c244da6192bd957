"""The batched sampler decodes exactly what transformers decodes, respects budgets, stops and filters, and compiles a
bounded number of programs; option scoring equals a plain forward pass."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from aloe_jax.core.errors import AloeError
from aloe_jax.models import masks, sharding
from aloe_jax.models.config import read_hf_config
from aloe_jax.models.weights import abstract_model, load_hf_model
from aloe_jax.sampling import Sampler, SamplingParams, score_options
from aloe_jax.sampling.sampler import bucket
from tests import tiny_models

# Mixed lengths spanning two prompt buckets (16 and 24), so left padding differs a lot between rows.
_LENGTHS = (3, 9, 17, 5)
PROMPTS = [np.random.RandomState(i).randint(3, 160, n).tolist() for i, n in enumerate(_LENGTHS)]
MAX_NEW = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny untied Llama 3 with larger-than-default init: peaked logits make greedy ties (and flaky argmax) unlikely
    and outputs varied rather than one repeated token."""
    from transformers import AutoModelForCausalLM

    hf_cfg = tiny_models.hf_config("llama3")
    hf_cfg.initializer_range = 0.1
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sampler_model")
    AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return load_hf_model(str(folder), read_hf_config(folder))


@pytest.fixture(scope="module")
def torch_model(folder):
    return tiny_models.load_torch_model(folder)


@pytest.fixture(scope="module")
def free_sampler(model):
    return Sampler(model, pad_id=0)


@pytest.fixture(scope="module")
def free_greedy(free_sampler):
    """Greedy continuations of PROMPTS with no stop token."""
    return [g.tokens for g in free_sampler.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW))]


@pytest.fixture(scope="module")
def stop_id(free_greedy):
    """A token that greedy decoding of prompt 1 emits mid-way (and the other rows do not), so rows finish both ways."""
    return free_greedy[1][2]


@pytest.fixture(scope="module")
def stop_sampler(model, stop_id):
    return Sampler(model, pad_id=0, stop_ids=[stop_id])


def _with_stop(generation):
    return generation.tokens + ([generation.stop_token] if generation.finish_reason == "stop" else [])


def _torch_next_logits(torch_model, prompt, generated):
    """`[len(generated), vocab]` logits that predicted each generated token, from one plain forward pass."""
    with torch.no_grad():
        logits = torch_model(torch.tensor([prompt + generated])).logits[0].numpy()
    return logits[len(prompt) - 1:len(prompt) - 1 + len(generated)]


def test_greedy_batched_equals_alone_and_transformers(stop_sampler, torch_model, stop_id):
    batched = stop_sampler.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW))
    assert {g.finish_reason for g in batched} == {"stop", "length"}, "the test should see both ways of finishing"
    for prompt, got in zip(PROMPTS, batched):
        alone = stop_sampler.generate([prompt], SamplingParams(max_new_tokens=MAX_NEW))[0]
        assert alone == got
        with torch.no_grad():
            ref = torch_model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                                       eos_token_id=stop_id, pad_token_id=0)[0, len(prompt):].tolist()
        assert _with_stop(got) == ref


@pytest.mark.parametrize("chunk, alternatives", [(8, ()), (16, (12,))])
def test_chunked_prefill_equals_one_pass_and_transformers(model, torch_model, monkeypatch, chunk, alternatives):
    """Prompt buckets of 16 and 24 tokens prefilled in chunks of 8 (2 and 3 chunks, the left padding spanning whole
    chunks for short rows), or of 16 where it divides the bucket and else 12 (one pass, 2 chunks), decode the same
    tokens, with the same log-probs, as one pass and as transformers."""
    from aloe_jax.sampling import sampler as sampler_module

    params = SamplingParams(max_new_tokens=MAX_NEW, top_logprobs=2)
    one_pass = Sampler(model, pad_id=0).generate(PROMPTS, params)
    monkeypatch.setattr(sampler_module, "_PREFILL_CHUNK", chunk)
    monkeypatch.setattr(sampler_module, "_PREFILL_CHUNK_ALT", alternatives)
    chunked_sampler = Sampler(model, pad_id=0)
    chunked = chunked_sampler.generate(PROMPTS, params)
    assert chunked_sampler.num_compiled == 1
    for prompt, got, ref in zip(PROMPTS, chunked, one_pass):
        assert got.tokens == ref.tokens
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)
        with torch.no_grad():
            expected = torch_model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                                            pad_token_id=0)[0, len(prompt):].tolist()
        assert got.tokens == expected


def test_per_row_budgets_stops_reasons_and_counts(stop_sampler, free_greedy, stop_id):
    budgets = [0, 7, 2, MAX_NEW]
    results = stop_sampler.generate(PROMPTS, SamplingParams(max_new_tokens=99), max_new_tokens=budgets)
    for prompt, free, budget, got in zip(PROMPTS, free_greedy, budgets, results):
        allowed = free[:budget]
        if stop_id in allowed:
            cut = allowed.index(stop_id)
            assert (got.finish_reason, got.tokens, got.stop_token) == ("stop", allowed[:cut], stop_id)
            assert got.completion_tokens == cut + 1
        else:
            assert (got.finish_reason, got.tokens, got.stop_token) == ("length", allowed, None)
            assert got.completion_tokens == budget
        assert got.prompt_tokens == len(prompt)
    assert "stop" in {g.finish_reason for g in results}, "a row should stop within its budget"


def test_each_of_several_stop_ids_ends_its_row(model, torch_model, free_greedy):
    """Three stop ids, each emitted by exactly one row (and by no other row at all): every row ends at its own, the
    smallest, middle and largest id alike, as transformers' generate with the same list of eos ids does."""
    stops = []
    for row in (1, 2, 3):
        others = {t for r, tokens in enumerate(free_greedy) if r != row for t in tokens}
        tokens = free_greedy[row]
        stops.append(next(t for i, t in enumerate(tokens) if i and t not in others and t not in tokens[:i]))
    results = Sampler(model, pad_id=0, stop_ids=stops).generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW))
    assert [g.stop_token for g in results] == [None] + stops
    for prompt, free, got in zip(PROMPTS, free_greedy, results):
        cut = next((i for i, t in enumerate(free) if t in stops), len(free))
        assert got.tokens == free[:cut] and got.completion_tokens == min(cut + 1, MAX_NEW)
        with torch.no_grad():
            ref = torch_model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                                       eos_token_id=stops, pad_token_id=0)[0, len(prompt):].tolist()
        assert _with_stop(got) == ref


def test_seeded_sampling_is_reproducible(free_sampler, free_greedy):
    params = SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, seed=7)
    first = free_sampler.generate(PROMPTS, params)
    assert free_sampler.generate(PROMPTS, params) == first
    other = free_sampler.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, seed=8))
    assert [g.tokens for g in other] != [g.tokens for g in first]
    # A row's draws depend on the seed and its row index, not on the rows after it or the batch bucket.
    assert free_sampler.generate(PROMPTS[:1], params)[0] == first[0]
    near_zero = free_sampler.generate(PROMPTS, SamplingParams(temperature=1e-6, max_new_tokens=MAX_NEW, seed=7))
    assert [g.tokens for g in near_zero] == free_greedy


@pytest.mark.parametrize("filters", [dict(top_k=4), dict(top_p=0.5), dict(top_k=6, top_p=0.6)])
def test_filtered_sampling_stays_in_the_allowed_set(free_sampler, torch_model, filters):
    temperature, top_p = 1.5, filters.get("top_p", 1.0)
    ranks = []
    for seed in range(3):
        params = SamplingParams(temperature=temperature, max_new_tokens=16, seed=seed, **filters)
        for prompt, got in zip(PROMPTS, free_sampler.generate(PROMPTS, params)):
            logits = _torch_next_logits(torch_model, prompt, got.tokens) / temperature  # [steps, vocab]
            chosen = logits[np.arange(len(got.tokens)), got.tokens][:, None]
            top_k = filters.get("top_k", logits.shape[-1])
            rank = (logits > chosen).sum(-1)
            assert (rank < top_k).all()
            # The nucleus is taken over the top-k tokens, renormalised (top-p after top-k, as in HF).
            in_top_k = logits >= np.sort(logits, axis=-1)[:, -top_k:][:, :1]
            probs = np.where(in_top_k, np.exp(logits - logits.max(-1, keepdims=True)), 0)
            probs /= probs.sum(-1, keepdims=True)
            mass_before = np.where(logits > chosen, probs, 0).sum(-1)  # mass of strictly more likely tokens
            assert (mass_before < top_p + 1e-5).all()
            ranks += rank.tolist()
    assert max(ranks) > 0, "sampling never left the top-1 token: the filters were not exercised"


def _reference_nucleus(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Kept-token mask of top-p by a full sort: the most likely tokens up to the first that brings the mass to ≥ p."""
    kept = np.zeros(logits.shape, bool)
    for row, values in enumerate(logits.astype(np.float64)):
        ordered = np.sort(values)[::-1]
        probs = np.exp(ordered - ordered.max())
        probs /= probs.sum()
        last = int(np.searchsorted(np.cumsum(probs), top_p))  # first index where the mass reaches top_p
        kept[row] = values >= ordered[min(last, len(ordered) - 1)]
    return kept


@pytest.mark.parametrize("scales", [(6, 9, 12), (6, 0.05, 12)])
def test_nucleus_from_top_candidates_equals_a_full_sort(monkeypatch, scales):
    """Peaked rows have their nucleus among the 64 candidates (fast path); a flat row (scale 0.05) needs thousands of
    tokens, so that batch falls back to the full sort. Both keep exactly the reference set."""
    from aloe_jax.sampling import sampler as sampler_module

    monkeypatch.setattr(sampler_module, "_NUCLEUS_CANDIDATES", 64)
    rng = np.random.RandomState(0)
    logits = np.stack([rng.randn(5000) * scale for scale in scales]).astype(np.float32)  # [3, 5000]
    mode = sampler_module._Mode(greedy=False, top_k=0, nucleus=True, logprobs=-1)
    filtered = jax.jit(lambda x: sampler_module._filter_logits(x, jnp.float32(0.9), mode))(logits)
    got = np.isfinite(np.asarray(filtered))
    np.testing.assert_array_equal(got, _reference_nucleus(logits, 0.9))
    fast_path_ok = sampler_module._nucleus_threshold(jax.lax.top_k(logits, 64)[0],
                                                     jax.nn.logsumexp(logits, axis=-1), 0.9)[1]
    assert list(np.asarray(fast_path_ok)) == [s > 1 for s in scales]
    assert (got.sum(-1) > 64).tolist() == [s < 1 for s in scales]  # the flat row keeps far more than the candidates


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (40, 0.7), (40, 0.95)])
def test_top_k_and_top_p_after_top_k_keep_exactly_the_reference_set(top_k, top_p):
    """Top-k keeps exactly the k most likely tokens; top-p after it keeps the nucleus of the distribution renormalised
    over those k (as HF's top-k then top-p warpers do), checked against a full sort."""
    from aloe_jax.sampling import sampler as sampler_module

    logits = (np.random.RandomState(1).randn(4, 300) * 3).astype(np.float32)  # [rows, vocab], no ties
    mode = sampler_module._Mode(greedy=False, top_k=top_k, nucleus=top_p < 1, logprobs=-1)
    filtered = jax.jit(lambda x: sampler_module._filter_logits(x, jnp.float32(top_p), mode))(logits)
    got = np.isfinite(np.asarray(filtered))
    in_top_k = logits >= np.sort(logits, axis=-1)[:, -top_k][:, None]
    assert (in_top_k.sum(-1) == top_k).all()
    want = in_top_k & _reference_nucleus(np.where(in_top_k, logits, -np.inf), top_p) if top_p < 1 else in_top_k
    np.testing.assert_array_equal(got, want)
    assert top_p == 1 or (want.sum(-1) < top_k).all(), "the nucleus should cut into the top-k set"


@contextlib.contextmanager
def _count_backend_compiles():
    """Yields a list that grows by one per XLA backend compilation inside the block."""
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_varied_calls_compile_a_bounded_number_of_programs(model):
    sampler = Sampler(model, pad_id=0, stop_ids=[2])
    rng = np.random.RandomState(0)
    with _count_backend_compiles() as compiles:
        for _ in range(10):
            prompts = [rng.randint(3, 160, rng.randint(1, 17)).tolist() for _ in range(rng.randint(5, 7))]
            sampler.generate(prompts, SamplingParams(max_new_tokens=int(rng.randint(1, 17))))
    # One program for all ten calls (none at all if an earlier test already compiled this shape on this model).
    assert sampler.num_compiled == 1 and len(compiles) <= 1
    assert len({bucket(n, 16) for n in range(1, 4097)}) == 17


def test_stepped_buckets_cap_the_padding_and_keep_long_prompts_chunked():
    from aloe_jax.sampling.sampler import _PREFILL_CHUNK, _PREFILL_CHUNK_ALT, BATCH_STEP, PROMPT_STEP

    for n in range(1, 4097):
        size = bucket(n, 16, PROMPT_STEP)
        assert n <= size <= bucket(n, 16) and (n <= PROMPT_STEP or size - n < PROMPT_STEP)
        # Every long prompt bucket splits into whole prefill chunks (one pass over it would be ~2x slower).
        assert size <= _PREFILL_CHUNK or any(size % c == 0 for c in (_PREFILL_CHUNK, *_PREFILL_CHUNK_ALT))
    assert [bucket(n, 1, BATCH_STEP) for n in (5, 6, 9, 100, 128)] == [6, 6, 12, 104, 128]
    assert bucket(1033, 16, PROMPT_STEP) == 1152 and bucket(1033, 16) == 1536


def test_samplers_of_one_architecture_share_compiled_programs(model):
    """A second model instance of the same architecture (the SFT checkpoint after the base model, say) reuses the
    programs compiled for the first: no XLA compilation, and its own parameters are the ones used."""
    prompts = [PROMPTS[1], PROMPTS[3]]
    params = SamplingParams(max_new_tokens=5)
    first = Sampler(model, pad_id=0).generate(prompts, params)
    other, flipped_model = nnx.clone(model), nnx.clone(model)
    flipped_model.lm_head[...] = -flipped_model.lm_head[...]  # the least likely token becomes the most likely
    with _count_backend_compiles() as compiles:
        same = Sampler(other, pad_id=0).generate(prompts, params)
        flipped = Sampler(flipped_model, pad_id=0).generate(prompts, params)
    assert compiles == []
    assert same == first
    assert [g.tokens for g in flipped] != [g.tokens for g in first]


def test_option_scores_equal_full_forward_log_probs(model):
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    options = [[7], [11, 12], [], [150, 3, 99]]
    scores = score_options(model, prompts, options, batch_size=5)  # 12 pairs → chunks of 5, 5, 2
    assert scores.shape == (3, 4)
    # One row at a time, full logits; right padding to one length keeps it to a single compiled shape.
    forward = nnx.jit(lambda m, ids, valid: jax.nn.log_softmax(
        m(ids, masks.positions_from_valid(valid), masks.causal_mask(valid))[0], axis=-1))
    for i, prompt in enumerate(prompts):
        for j, option in enumerate(options):
            ids = np.zeros((1, 32), np.int32)
            ids[0, :len(prompt + option)] = prompt + option
            logps = np.asarray(forward(model, ids, np.arange(32)[None] < len(prompt + option)))[0]  # [seq, vocab]
            expected = sum(logps[len(prompt) - 1 + t, tok] for t, tok in enumerate(option))
            assert abs(scores[i, j] - expected) <= 1e-5, (i, j)


def test_single_token_options_scored_in_one_row_per_prompt_equal_the_pairwise_path(model):
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    single = [[7], [11], [], [150]]
    fast = score_options(model, prompts, single, batch_size=2)  # one row per prompt
    # A two-token dummy option forces one row per (prompt, option) pair; its column is dropped.
    pairwise = score_options(model, prompts, single + [[3, 4]], batch_size=5)[:, :4]
    np.testing.assert_allclose(fast, pairwise, atol=1e-5)
    assert (fast[:, 2] == 0).all() and (fast[:, [0, 1, 3]] < 0).all()


def test_mesh_sharded_greedy_equals_single_device(folder, free_greedy):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    cfg = read_hf_config(folder)
    sharded = load_hf_model(str(folder), cfg, shardings=sharding.param_shardings(abstract_model(cfg), mesh))
    sampler = Sampler(sharded, pad_id=0, mesh=mesh)
    # 3 prompts on 4 batch shards: a dummy row pads the batch to a multiple of data × fsdp.
    results = sampler.generate(PROMPTS[1:], SamplingParams(max_new_tokens=MAX_NEW))
    assert [g.tokens for g in results] == free_greedy[1:]


@pytest.mark.parametrize("bad", [dict(max_new_tokens=-1), dict(temperature=-0.5), dict(top_p=0.0), dict(top_k=-2),
                                 dict(seed=-1), dict(temperature=float("nan"))])
def test_invalid_sampling_params_are_typed_errors(bad):
    with pytest.raises(AloeError):
        SamplingParams(**bad)


@pytest.mark.parametrize("prompts, budgets", [([[]], None), ([[5, 160]], None), ([[5]], [1, 2]), ([[5]], [-1])])
def test_invalid_prompts_and_budgets_are_typed_errors(free_sampler, prompts, budgets):
    with pytest.raises(AloeError):
        free_sampler.generate(prompts, SamplingParams(), max_new_tokens=budgets)
