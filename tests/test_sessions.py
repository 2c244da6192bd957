"""Session caches (aloe_jax/sampling/sessions.py): a session turn gives exactly what `Sampler.generate` gives for the
whole prompt — the same greedy tokens, the same sampled draws, log-probs within 1e-4 — while prefilling only the
tokens its row does not hold; also after fork, spill/restore, truncate, capacity growth and grow_rows, and through
SessionCache's prompt-to-row matching, per-role pools and eviction.

Compile time dominates on CPU, so the tests share shapes: 4-row pools at capacity 192 (every prompt of the tiny-model
conversations lies in the 192-token bucket), turns that prefill at most 16 new tokens, one sampling mode per model.
"""

import numpy as np
import pytest

from aloe_jax.models.config import read_hf_config
from aloe_jax.models.weights import load_hf_model
from aloe_jax.sampling import Sampler, SamplingParams
from aloe_jax.sampling.sessions import SessionCache, SessionPool, cache_bytes_per_token
from tests import tiny_models

VOCAB = 160
# Rows of very different lengths: 3 vs 130 tokens. The long row decodes few tokens and gets short user chunks so that
# its conversation stays inside the 192-token bucket for all turns (one compiled program per side and model).
START = (3, 130, 17, 9)
BUDGETS = [8, 3, 6, 8]
CHUNK_MAX = (12, 5, 12, 12)
TURNS = 6
# (turn, row): the next prompt re-writes the reply's second-to-last token, as a template that re-tokenizes a reply
# differently does; the row must keep only the common prefix.
EDITS = {(2, 0), (4, 3), (3, 2)}
GREEDY = SamplingParams(top_logprobs=2)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, seed=7, top_logprobs=2)


def _first_prompts(start=START, salt=0):
    return [np.random.RandomState(100 * salt + i).randint(3, VOCAB, n).tolist() for i, n in enumerate(start)]


def _chunk(row: int, turn: int, salt: int = 0, most: int | None = None) -> list[int]:
    rng = np.random.RandomState(1000 + 97 * salt + 10 * row + turn)
    return rng.randint(3, VOCAB, rng.randint(1, (most or CHUNK_MAX[row]) + 1)).tolist()


def _full(g) -> list[int]:
    """The generated tokens with the stop token: what the conversation continues with."""
    return g.tokens + ([g.stop_token] if g.finish_reason == "stop" else [])


def _held_after(prompt, g) -> list[int]:
    """What a row holds after generating `g` from `prompt`: the prompt and every generated token but the last (the
    last one was picked, never fed)."""
    return list(prompt) + _full(g)[:-1]


def _kept(held, prompt) -> int:
    """Tokens of `prompt` a row holding `held` need not prefill: the common prefix, but at least one token is
    prefilled (its logits pick the first new token). Written out here, independently of sessions.common_prefix."""
    n = 0
    while n < len(held) and n < len(prompt) and held[n] == prompt[n]:
        n += 1
    return min(n, len(prompt) - 1)


def _assert_same(got, ref, what=""):
    assert got.tokens == ref.tokens, what
    assert (got.finish_reason, got.stop_token, got.completion_tokens, got.prompt_tokens) == \
        (ref.finish_reason, ref.stop_token, ref.completion_tokens, ref.prompt_tokens), what
    assert (got.logprobs is None) == (ref.logprobs is None), what
    if ref.logprobs is not None:
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-4, err_msg=what)
        assert [[i for i, _ in t] for t in got.top_logprobs] == [[i for i, _ in t] for t in ref.top_logprobs], what
        np.testing.assert_allclose(np.asarray([[lp for _, lp in t] for t in got.top_logprobs]).reshape(-1),
                                   np.asarray([[lp for _, lp in t] for t in ref.top_logprobs]).reshape(-1),
                                   atol=1e-4, err_msg=what)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family → tiny model (loaded on first use), with initializer_range 0.1 like test_sampler.py's: peaked logits,
    no near-ties for greedy."""
    root = tmp_path_factory.mktemp("session_models")
    loaded = {}

    def get(name):
        if name not in loaded:
            folder = tiny_models.save_tiny_model(name, root / name, initializer_range=0.1)
            loaded[name] = load_hf_model(str(folder), read_hf_config(folder))
        return loaded[name]

    return get


@pytest.fixture(scope="module")
def stop_of(tiny):
    """(family, params) → a stop token that ends some rows of the first turn and not others (chosen from a probe
    decode that runs the same compiled program as the tests: one stop id, that never matches)."""
    chosen = {}

    def get(name, params=GREEDY):
        if (name, params) not in chosen:
            probe = Sampler(tiny(name), pad_id=0, stop_ids=[VOCAB + 7])
            outs = [g.tokens for g in probe.generate(_first_prompts(), params, [max(BUDGETS)] * 4)]
            candidates = sorted({t for out in outs for t in out[1:]})
            mixed = [t for t in candidates if 0 < sum(t in out[:b] for out, b in zip(outs, BUDGETS)) < len(outs)]
            assert mixed, outs
            chosen[name, params] = mixed[0]
        return chosen[name, params]

    return get


def _next_prompts(prompts, generations, turn, salt=0):
    out = []
    for row, (prompt, g) in enumerate(zip(prompts, generations)):
        reply = _full(g)
        if (turn, row) in EDITS and len(reply) >= 2:
            reply[-2] = (reply[-2] + 1) % VOCAB
        out.append(list(prompt) + reply + _chunk(row, turn, salt))
    return out


def _run_turns(model, stop, params, kv_dtype=None, reference=True):
    """TURNS turns of 4 conversations on a 4-row pool, each turn checked against Sampler.generate of the whole prompts
    and its prefill count against what the rows held. Returns (per-turn generations, pool)."""
    sampler = Sampler(model, pad_id=0, stop_ids=[stop])
    pool = SessionPool(model, 4, stop_ids=[stop], kv_dtype=kv_dtype)
    prompts, held = _first_prompts(), [[] for _ in START]
    history, reasons, diverged, capacities = [], set(), 0, []
    prompt_total = 0
    for turn in range(TURNS):
        expected_kept = [_kept(h, p) for h, p in zip(held, prompts)]
        diverged += sum(k < len(h) for k, h in zip(expected_kept, held) if h)
        before = pool.prefilled_tokens, pool.reused_tokens
        got = pool.generate(range(4), prompts, params, BUDGETS)
        if reference:
            ref = sampler.generate(prompts, params, BUDGETS)
            for row, (g, r) in enumerate(zip(got, ref)):
                _assert_same(g, r, f"turn {turn} row {row}")
        assert [g.cached_tokens for g in got] == expected_kept, f"turn {turn}"
        assert pool.prefilled_tokens - before[0] == sum(len(p) - k for p, k in zip(prompts, expected_kept))
        assert pool.reused_tokens - before[1] == sum(expected_kept)
        held = [_held_after(p, g) for p, g in zip(prompts, got)]
        assert [pool.tokens(r) for r in range(4)] == held
        reasons |= {g.finish_reason for g in got}
        prompt_total += sum(map(len, prompts))
        capacities.append(pool.capacity)
        history.append(got)
        prompts = _next_prompts(prompts, got, turn + 1)
    assert reasons == {"stop", "length"}, "rows should end both by stop and by length"
    assert diverged >= 2, "some turns should re-write what a row holds"
    assert capacities == [192] * TURNS, "the conversations are sized to stay in one capacity bucket"
    assert pool.prefilled_tokens < prompt_total / 4
    return history, pool


@pytest.mark.parametrize("family", list(tiny_models.FAMILIES))
def test_session_turns_equal_full_reprefill_for_every_family(tiny, stop_of, family):
    _run_turns(tiny(family), stop_of(family), GREEDY)


def test_sampled_turns_and_forked_groups_draw_what_the_stateless_sampler_draws(tiny, stop_of):
    """Temperature 0.8, top-p 0.9: every turn draws what Sampler.generate draws for the whole prompts with the same
    seed; then an RL group (one prompt forked into every row) draws the sampler's rows 0..3, and `choices` picks which
    of them a call's rows draw."""
    model, stop = tiny("llama3"), stop_of("llama3", SAMPLED)
    history, pool = _run_turns(model, stop, SAMPLED)
    sampler = Sampler(model, pad_id=0, stop_ids=[stop])
    # Row 1 holds conversation 1's six turns: fork it into every row, then each row draws a reply to its next prompt.
    held = pool.tokens(1)
    group_prompt = held + _chunk(1, TURNS, most=4)
    for row in (0, 2, 3):
        pool.fork(1, row)
    group = pool.generate(range(4), [group_prompt] * 4, SAMPLED, [6] * 4)
    ref = sampler.generate([group_prompt] * 4, SAMPLED, [6] * 4)
    for row, (g, r) in enumerate(zip(group, ref)):
        _assert_same(g, r, f"group row {row}")
        assert g.cached_tokens == len(held)
    assert len({tuple(r.tokens) for r in ref}) > 1, "the group's draws should differ"
    # The same prompt again (every row holds it: only its last token is prefilled), rows 2 and 0 drawing as the
    # sampler's rows 3 and 1.
    again = pool.generate([2, 0], [group_prompt] * 2, SAMPLED, [6] * 2, choices=[3, 1])
    for g, r in zip(again, (ref[3], ref[1])):
        _assert_same(g, r)
        assert g.cached_tokens == len(group_prompt) - 1
    assert ref[3].tokens != ref[1].tokens


def _pool_after_one_turn(model, stop):
    sampler = Sampler(model, pad_id=0, stop_ids=[stop])
    pool = SessionPool(model, 4, stop_ids=[stop])
    prompts = _first_prompts()
    got = pool.generate(range(4), prompts, GREEDY, BUDGETS)
    for g, r in zip(got, sampler.generate(prompts, GREEDY, BUDGETS)):
        _assert_same(g, r)
    return sampler, pool, prompts, got


def _check_turn(sampler, pool, rows, prompts, budgets, expected_cached, what):
    got = pool.generate(rows, prompts, GREEDY, budgets)
    for row, (g, r) in enumerate(zip(got, sampler.generate(prompts, GREEDY, budgets))):
        _assert_same(g, r, f"{what} row {row}")
    assert [g.cached_tokens for g in got] == expected_cached, what
    return got


def test_fork_spill_restore_and_truncate_keep_turns_equal(tiny, stop_of):
    model, stop = tiny("llama3"), stop_of("llama3")
    sampler, pool, prompts, got = _pool_after_one_turn(model, stop)
    held = [_held_after(p, g) for p, g in zip(prompts, got)]

    # Fork: conversation 1 branches into rows 1 and 3 (row 3's own conversation is dropped).
    pool.fork(1, 3)
    assert pool.tokens(3) == held[1]
    branch = lambda salt: list(prompts[1]) + _full(got[1]) + _chunk(1, 1, salt, most=9)  # noqa: E731
    step = [list(prompts[0]) + _full(got[0]) + _chunk(0, 1), branch(1),
            list(prompts[2]) + _full(got[2]) + _chunk(2, 1), branch(2)]
    assert branch(1) != branch(2)
    got = _check_turn(sampler, pool, range(4), step, BUDGETS, [len(held[0]), len(held[1]), len(held[2]),
                                                                len(held[1])], "after fork")
    held = [_held_after(p, g) for p, g in zip(step, got)]

    # Spill rows 0 and 2 to host, restore each into the other's row.
    spilled = {row: pool.spill(row) for row in (0, 2)}
    assert pool.tokens(0) == pool.tokens(2) == []
    assert list(spilled[0].tokens) == held[0] and spilled[0].keys[0].shape[1] == len(held[0])
    pool.restore(2, spilled[0])
    pool.restore(0, spilled[2])
    assert pool.tokens(0) == held[2] and pool.tokens(2) == held[0]
    swapped = [list(step[2]) + _full(got[2]) + _chunk(2, 2), list(step[1]) + _full(got[1]) + _chunk(1, 2),
               list(step[0]) + _full(got[0]) + _chunk(0, 2), list(step[3]) + _full(got[3]) + _chunk(3, 2, most=5)]
    budgets = [BUDGETS[2], BUDGETS[1], BUDGETS[0], BUDGETS[1]]
    got = _check_turn(sampler, pool, range(4), swapped, budgets, [len(held[2]), len(held[1]), len(held[0]),
                                                                  len(held[3])], "after spill and restore")
    held = [_held_after(p, g) for p, g in zip(swapped, got)]

    # Truncate row 1 ten tokens back; the next prompt repeats two of the dropped tokens, which must be prefilled
    # again. Row 3 asks for its last prompt again: every token held, only the last one prefilled. Only rows 1 and 3
    # take part in this call (the sampler gets each prompt twice: its greedy rows do not depend on each other).
    cut = len(held[1]) - 10
    pool.truncate(1, cut)
    assert pool.tokens(1) == held[1][:cut]
    pair = [held[1][:cut + 2] + _chunk(1, 3), list(swapped[3])]
    got_pair = pool.generate([1, 3], pair, GREEDY, [BUDGETS[1]] * 2)
    for g, r in zip(got_pair, sampler.generate(pair * 2, GREEDY, [BUDGETS[1]] * 4)):
        _assert_same(g, r, "after truncate")
    assert [g.cached_tokens for g in got_pair] == [cut, len(swapped[3]) - 1]

    # All rows again: rows 0 and 2, left out of the last call, still hold (and reuse) their conversations.
    last = [list(swapped[0]) + _full(got[0]) + _chunk(0, 3), pair[0] + _full(got_pair[0]) + _chunk(1, 4, most=5),
            list(swapped[2]) + _full(got[2]) + _chunk(2, 3), pair[1] + _full(got_pair[1]) + _chunk(3, 4, most=5)]
    _check_turn(sampler, pool, range(4), last, budgets,
                [len(held[0]), len(_held_after(pair[0], got_pair[0])), len(held[2]),
                 len(_held_after(pair[1], got_pair[1]))], "after a call without rows 0 and 2")


def test_capacity_and_row_growth_keep_what_rows_hold(tiny, stop_of):
    """grow_rows(8) keeps the four rows' caches; then a turn that no longer fits the 192-slot bucket grows the
    capacity, and every row — old ones reusing, new ones fresh — still decodes what the sampler decodes."""
    model, stop = tiny("llama3"), stop_of("llama3")
    sampler, pool, prompts, got = _pool_after_one_turn(model, stop)
    held = [_held_after(p, g) for p, g in zip(prompts, got)]
    pool.grow_rows(8)
    assert pool.rows == 8 and pool.cache.keys[0].shape[0] == 8
    assert [pool.tokens(r) for r in range(8)] == held + [[]] * 4
    assert pool.capacity == 192
    long_tail = np.random.RandomState(5).randint(3, VOCAB, 70).tolist()
    step = [list(p) + _full(g) + (long_tail if row == 1 else _chunk(row, 1)) for row, (p, g) in
            enumerate(zip(prompts, got))] + _first_prompts((5, 21, 2, 33), salt=3)
    assert len(step[1]) > 192, "row 1's turn must not fit the bucket"
    budgets = BUDGETS + BUDGETS
    _check_turn(sampler, pool, range(8), step, budgets, [len(h) for h in held] + [0] * 4, "after growth")
    assert pool.capacity > 192


def test_a_call_on_few_rows_decodes_only_them_over_their_own_window(tiny, stop_of, monkeypatch):
    """A call on 2 rows of an 8-row pool whose other rows hold long conversations (the repeat guard's resamples)
    decodes those 2 rows only, over a window their own lengths set; a 3-row call runs 4 rows (padded with another
    row, which it must leave intact); afterwards every row still decodes what the sampler decodes."""
    from aloe_jax.sampling import sessions

    model, stop = tiny("llama3"), stop_of("llama3")
    sampler = Sampler(model, pad_id=0, stop_ids=[stop])
    pool = SessionPool(model, 8, stop_ids=[stop])
    prompts = _first_prompts((150, 140, 130, 150, 145, 135), salt=4) + _first_prompts((5, 9), salt=5)
    budgets = [6] * 8
    got = _check_turn(sampler, pool, range(8), prompts, budgets, [0] * 8, "first turn")
    held = [_held_after(p, g) for p, g in zip(prompts, got)]
    decoded = []
    real = sessions._decode_program

    def spy(graphdef, mode, steps, window, all_rows):
        program = real(graphdef, mode, steps, window, all_rows)

        def run(state, cache, *rest):
            decoded.append((window, 8 if all_rows else len(rest[0])))
            return program(state, cache, *rest)
        return run

    monkeypatch.setattr(sessions, "_decode_program", spy)
    step = {r: held[r] + _chunk(r % 4, 1) for r in (6, 7)}
    got = _check_turn(sampler, pool, [6, 7], [step[6], step[7]], [6, 6], [len(held[6]), len(held[7])], "two rows")
    assert decoded[-1][1] == 2, decoded
    assert decoded[-1][0] < min(len(held[r]) for r in range(6)), decoded
    held[6], held[7] = (_held_after(step[r], g) for r, g in zip((6, 7), got))

    step = {r: held[r] + _chunk(r % 4, 2) for r in (0, 6, 7)}
    got = _check_turn(sampler, pool, [0, 6, 7], list(step.values()), [6, 6, 6],
                      [len(held[r]) for r in step], "three rows")
    assert decoded[-1][1] == 4, decoded
    for r, g in zip(step, got):
        held[r] = _held_after(step[r], g)
    assert [pool.tokens(r) for r in range(8)] == held

    last = [h + _chunk(r % 4, 3, most=4) for r, h in enumerate(held)]
    _check_turn(sampler, pool, range(8), last, budgets, [len(h) for h in held], "every row after the small calls")
    assert decoded[-1][1] == 8


def test_session_cache_forks_branches_in_one_call(tiny, stop_of):
    """Two branches of one conversation in one call: one takes the row holding the conversation, the other a copy of
    it in a row nobody else reuses; both equal the sampler and reuse everything held."""
    model, stop = tiny("llama3"), stop_of("llama3")
    sampler = Sampler(model, pad_id=0, stop_ids=[stop])
    cache = SessionCache(model, stop_ids=[stop])
    prompts = _first_prompts()
    first = cache.generate(prompts, GREEDY, BUDGETS)
    for g, r in zip(first, sampler.generate(prompts, GREEDY, BUDGETS)):
        _assert_same(g, r)
    held = [_held_after(p, g) for p, g in zip(prompts, first)]
    branch = lambda salt: list(prompts[1]) + _full(first[1]) + _chunk(1, 1, salt, most=9)  # noqa: E731
    step = [list(prompts[0]) + _full(first[0]) + _chunk(0, 1), branch(1), branch(2),
            list(prompts[2]) + _full(first[2]) + _chunk(2, 1)]
    budgets = [BUDGETS[0], BUDGETS[1], BUDGETS[1], BUDGETS[2]]
    before = cache.prefilled_tokens
    got = cache.generate(step, GREEDY, budgets)
    for row, (g, r) in enumerate(zip(got, sampler.generate(step, GREEDY, budgets))):
        _assert_same(g, r, f"branch call row {row}")
    assert len(cache.pools) == 1
    assert [g.cached_tokens for g in got] == [len(held[0]), len(held[1]), len(held[1]), len(held[2])]
    assert cache.prefilled_tokens - before == sum(len(p) for p in step) - sum(g.cached_tokens for g in got)


def _role_prompts(role: int, conversation: list[list[int]]) -> list[list[int]]:
    """A role's prompts: BOS, the role's own 100-token instructions, then the conversation (every role's prompt
    shares the BOS, as chat templates' prompts share their header)."""
    instructions = np.random.RandomState(50 + role).randint(3, VOCAB, 100).tolist()
    return [[1] + instructions + c for c in conversation]


def _interleaved_roles(model, stop, max_bytes):
    """Two roles (different instructions after a shared BOS) called in turn over three turns of four conversations;
    every call checked against the sampler. Returns the cache and each call's generations."""
    sampler = Sampler(model, pad_id=0, stop_ids=[stop])
    cache = SessionCache(model, stop_ids=[stop], max_bytes=max_bytes)
    per_token = cache_bytes_per_token(model)
    conversations = {role: _first_prompts((3, 30, 12, 7), salt=10 + role) for role in (0, 1)}
    calls = []
    for turn in range(3):
        for role in (0, 1):
            prompts = _role_prompts(role, conversations[role])
            got = cache.generate(prompts, GREEDY, BUDGETS)
            for row, (g, r) in enumerate(zip(got, sampler.generate(prompts, GREEDY, BUDGETS))):
                _assert_same(g, r, f"turn {turn} role {role} row {row}")
            calls.append((role, prompts, got))
            total = sum(p.rows * p.capacity * per_token for p in cache.pools)
            assert len(cache.pools) == 1 or total <= max_bytes, (turn, role, total)
            conversations[role] = [c + _full(g) + _chunk(i, turn, salt=role, most=5)
                                   for i, (c, g) in enumerate(zip(conversations[role], got))]
    return cache, calls


def test_session_cache_gives_each_role_its_pool_and_evicts_within_max_bytes(tiny, stop_of):
    model, stop = tiny("llama3"), stop_of("llama3")
    cache, calls = _interleaved_roles(model, stop, max_bytes=2**30)
    assert len(cache.pools) == 2
    # From its second call on, each role's rows hold its conversations: everything held is reused.
    for (role, prompts, got), (_, previous_prompts, previous) in zip(calls[2:], calls):
        held = [_held_after(p, g) for p, g in zip(previous_prompts, previous)]
        assert [g.cached_tokens for g in got] == [_kept(h, p) for h, p in zip(held, prompts)]
        assert all(g.cached_tokens > 100 for g in got)
    assert cache.prefilled_tokens + cache.reused_tokens == sum(len(p) for _, ps, _ in calls for p in ps)

    # Room for one pool only: each call evicts the other role's pool; the results stay equal (checked inside).
    one_pool = 4 * 192 * cache_bytes_per_token(model)
    small, small_calls = _interleaved_roles(model, stop, max_bytes=one_pool + one_pool // 2)
    assert len(small.pools) == 1
    assert small.prefilled_tokens + small.reused_tokens == sum(len(p) for _, ps, _ in small_calls for p in ps)
    assert small.prefilled_tokens > cache.prefilled_tokens


def test_max_bytes_counts_the_capacity_a_turn_really_takes(tiny, stop_of):
    """Room for two 192-slot pools. A turn that adds one token to a 180-token row still needs a new bucket (its one
    new token is prefilled in a 16-slot block starting at slot 180): the other pool must go, though the prompt and
    budget alone (182 slots) fit in 192."""
    model, stop = tiny("llama3"), stop_of("llama3")
    sampler = Sampler(model, pad_id=0, stop_ids=[stop])
    per_token = cache_bytes_per_token(model)
    max_bytes = 2 * 4 * 192 * per_token
    cache = SessionCache(model, stop_ids=[stop], max_bytes=max_bytes)
    calls = [_role_prompts(0, _first_prompts((3, 30, 12, 7), salt=10)),
             _role_prompts(1, _first_prompts((3, 79, 12, 7), salt=11))]
    budgets = [1] * 4
    for prompts in calls + [None]:
        if prompts is None:  # role 1 again, each row's reply appended (one new token per row)
            prompts = [p + _full(g) for p, g in zip(calls[1], got)]
            assert max(map(len, prompts)) == 181
        got = cache.generate(prompts, GREEDY, budgets)
        for g, r in zip(got, sampler.generate(prompts, GREEDY, budgets)):
            _assert_same(g, r)
        total = sum(p.rows * p.capacity * per_token for p in cache.pools)
        assert len(cache.pools) == 1 or total <= max_bytes, [(p.rows, p.capacity) for p in cache.pools]
    assert [g.cached_tokens for g in got] == [len(p) - 1 for p in prompts]
    assert cache.pools[-1].capacity > 192 and len(cache.pools) == 1


def test_bfloat16_kv_cache_decodes_and_reuses(tiny, stop_of):
    """A bf16 cache halves the cache bytes; greedy tokens may drift from fp32, so this reports how many differ over
    the turns and asserts only that it decodes and reuses what its rows hold."""
    model, stop = tiny("llama3"), stop_of("llama3")
    assert cache_bytes_per_token(model, "bfloat16") * 2 == cache_bytes_per_token(model)
    fp32, _ = _run_turns(model, stop, GREEDY, reference=False)
    bf16, pool = _run_turns(model, stop, GREEDY, kv_dtype="bfloat16", reference=False)
    assert pool.cache.keys[0].dtype.name == "bfloat16"
    total = sum(len(g.tokens) for turn in fp32 for g in turn)
    differ = sum(a != b for t32, t16 in zip(fp32, bf16) for g32, g16 in zip(t32, t16)
                 for a, b in zip(g32.tokens + [None] * 16, g16.tokens + [None] * 16))
    print(f"bf16 KV cache: {differ} of {total} greedy tokens differ from the fp32 cache over {TURNS} turns")
    assert all(g.completion_tokens > 0 for turn in bf16 for g in turn)
    assert pool.reused_tokens > pool.prefilled_tokens


def test_smollm2_chat_turns_equal_full_reprefill(smollm2_tokenizer):
    """The real SmolLM2 through its chat template: 2 conversations × 6 turns of ~8-token replies decoded with a
    SessionCache equal the ChatEngine's sampler re-prefilling every turn, and reuse what the rows hold."""
    from aloe_jax.models.loader import load_model
    from aloe_jax.models.tokenizer import encode_chat, stop_token_ids

    model, tokenizer = load_model("smollm2-135m")
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampler = Sampler(model, pad_id=int(pad), stop_ids=stops)
    cache = SessionCache(model, stop_ids=stops)
    # A system prompt of ~250 tokens and one-word questions: all six turns' prompts lie in the 257..384-token bucket,
    # so each side compiles one prefill length (the 30-layer model's compilations are most of this test's time).
    system = ("You are a concise assistant for a hiking club. Answer in one short sentence. The club meets every "
              "Saturday at eight in the morning at the north trailhead, beside the old stone bridge and the blue "
              "signpost. Walks are between ten and twenty kilometres long and follow the ridge, the lake loop or the "
              "forest track, depending on the weather and on who comes. Every member brings two litres of water, a "
              "paper map of the valley, a whistle, a head torch, sun cream and a light rain jacket; boots with a "
              "good grip are required on the ridge. Beginners are welcome on the lake loop, which is flat and about "
              "ten kilometres. Dogs must stay on a lead near the farms. The walk leader carries a first aid kit and "
              "a phone; if anyone is lost, they stay where they are and blow the whistle three times. After the "
              "walk, the group shares lunch at the café in the village square, and new members can borrow poles and "
              "maps from the club's shelf there. Membership costs twenty euros a year and covers insurance; pay it "
              "at the café to the treasurer, who also keeps the list of walks for the season and the phone numbers of "
              "every walk leader and every guide.")
    users = [["Where?", "When?", "Bring?", "Distance?", "Beginners?", "Thanks!"],
             ["Hard?", "Water?", "Maps?", "Day?", "Dogs?", "Bye."]]
    conversations = [[{"role": "system", "content": system}] for _ in users]
    params = SamplingParams(top_logprobs=1)
    prompt_total, lengths = 0, []
    for turn in range(6):
        for conversation, asks in zip(conversations, users):
            conversation.append({"role": "user", "content": asks[turn]})
        prompts = [encode_chat(tokenizer, c, add_generation_prompt=True)[0] for c in conversations]
        prompt_total += sum(map(len, prompts))
        got = cache.generate(prompts, params, [8, 8])
        for row, (g, r) in enumerate(zip(got, sampler.generate(prompts, params, [8, 8]))):
            _assert_same(g, r, f"turn {turn} conversation {row}")
        lengths.append((list(map(len, prompts)), [g.cached_tokens for g in got], cache.pools[0].capacity))
        if turn:
            assert all(g.cached_tokens > len(p) - 40 for g, p in zip(got, prompts)), lengths
        for conversation, g in zip(conversations, got):
            conversation.append({"role": "assistant",
                                 "content": tokenizer.decode(g.tokens, skip_special_tokens=True).strip()})
    assert cache.prefilled_tokens + cache.reused_tokens == prompt_total
    assert cache.prefilled_tokens < prompt_total / 3
    print(f"SmolLM2 sessions: (prompt tokens, cached, capacity) per turn {lengths}; sampler compiled "
          f"{sampler.num_compiled} program(s)")
