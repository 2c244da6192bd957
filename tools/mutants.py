"""Curated plausible bugs over the core, one at a time: each must make at least one of its tests fail.

`tools/mutate.py` applies each mutant to a scratch copy of the repository and runs only its `tests` (files or pytest
node ids). A mutant whose `original` snippet is not found exactly once is reported STALE: update the snippet after
refactoring the code it targets, do not delete the mutant. A new core code path adds its mutants here.

`equivalent` marks a mutant that no test can (or should) kill, with the reason; it is run but left out of the kill
rate.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One bug: replace `original` (found exactly once in `file`) by `replacement`; `tests` must then fail."""

    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    description: str
    equivalent: str | None = None


_LOSSES = "tests/test_losses.py"
_TRAINER = "tests/test_trainer.py"
_MODELS = "tests/test_models.py"
_SAMPLER = "tests/test_sampler.py"
_PACKING = "tests/test_packing.py"
_METRICS = "tests/test_eval_metrics.py"
_PIPELINE = "tests/test_train_inputs.py"
_CONVERSATION = "tests/test_conversation.py"
_THREE_BANDS = f"{_MODELS}::test_llama31_rope_scaling_in_all_three_bands_matches_transformers"
_LOGITS_PARITY = f"{_MODELS}::test_logits_match_transformers_with_and_without_padding"
_EXPORT = f"{_MODELS}::test_export_round_trip_and_transformers_loads_export"
_ATTENTION_KERNEL = "tests/test_attention.py::test_blockwise_kernel_equals_dense_on_tree_masks_forward_and_gradient"
_STACKED = "tests/test_attention.py::test_stacked_layers_round_trip_and_checkpoint_of_a_scan_run_loads_unrolled"
_WHAT_RUNS = "tests/test_attention.py::test_the_configured_kernel_and_remat_policy_are_what_runs"
_CHECKPOINT = f"{_TRAINER}::test_checkpoint_restores_onto_another_mesh_with_data_position_and_loads_as_a_model"

MUTANTS: list[Mutant] = [
    # --- DPO objective and its step -------------------------------------------------------------------------------
    Mutant("dpo_pairs_swapped", "aloe_jax/train/step.py",
           "    chosen, rejected = pair_logprobs(logps, batch, normalise)\n"
           "    ref_chosen, ref_rejected = pair_logprobs(ref_logps, batch, normalise)",
           "    rejected, chosen = pair_logprobs(logps, batch, normalise)\n"
           "    ref_rejected, ref_chosen = pair_logprobs(ref_logps, batch, normalise)",
           (_LOSSES, _TRAINER), "DPO trained backwards: chosen and rejected swapped for policy and reference"),
    Mutant("ipo_not_length_normalised", "aloe_jax/train/step.py",
           'normalise = dpo.loss_type == "ipo"', "normalise = False",
           (_LOSSES,), "IPO on summed instead of per-token mean log-probs"),
    Mutant("length_normalised_for_every_loss", "aloe_jax/train/step.py",
           'normalise = dpo.loss_type == "ipo"', "normalise = True",
           (_LOSSES,), "sigmoid and hinge DPO on per-token means instead of sums"),
    Mutant("grads_not_normalised", "aloe_jax/train/step.py",
           "return jax.tree.map(lambda g: g / weight, grads), metrics", "return grads, metrics",
           (_TRAINER,), "accumulated gradient is the loss sum's, not the batch mean's (the loss metric still is)"),
    Mutant("micro_batches_contiguous", "aloe_jax/train/step.py",
           "x = x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)",
           "x = x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:])",
           (f"{_TRAINER}::test_accumulating_4_micro_batches_equals_one_4x_batch",),
           "micro-batches take contiguous rather than strided rows",
           equivalent="the gradient is a sum over micro-batches, so which rows share a micro-batch changes no number "
                      "(beyond float summation order); it only changes how each micro-batch spreads over the devices, "
                      "a throughput property that no CPU test measures"),
    Mutant("dpo_sigmoid_smoothing_sign", "aloe_jax/train/losses.py",
           "- label_smoothing * jax.nn.log_sigmoid(-beta * margin)",
           "+ label_smoothing * jax.nn.log_sigmoid(-beta * margin)",
           (_LOSSES,), "conservative DPO's label smoothing term with the wrong sign"),
    Mutant("ipo_target_margin", "aloe_jax/train/losses.py",
           "jnp.square(margin - 1 / (2 * beta))", "jnp.square(margin - 1 / beta)",
           (_LOSSES,), "IPO regresses the margin to 1/β instead of 1/(2β)"),
    Mutant("hinge_without_beta", "aloe_jax/train/losses.py",
           "jax.nn.relu(1 - beta * margin)", "jax.nn.relu(1 - margin)",
           (_LOSSES,), "hinge loss ignores β"),
    Mutant("dpo_reward_without_reference", "aloe_jax/train/losses.py",
           "chosen_rewards = beta * (chosen_logps - ref_chosen_logps)", "chosen_rewards = beta * chosen_logps",
           (_LOSSES,), "chosen reward metric forgets the reference log-prob"),
    Mutant("unjudged_pair_weighted", "aloe_jax/train/inputs/batch.py",
           '            if tree.judged[turn]:\n                batch["pair_weight"][row, p] = 1.0',
           '            batch["pair_weight"][row, p] = 1.0',
           (_LOSSES,), "pairs without a verdict are trained on"),
    Mutant("unjudged_reply_sft_target", "aloe_jax/train/inputs/batch.py",
           '            if tree.judged[turn]:\n'
           '                batch["sft_weight"][row, :n] += tree.reply_index == chosen',
           '            batch["sft_weight"][row, :n] += tree.reply_index == chosen',
           (_LOSSES,), "SFT trains on preferred replies of unjudged turns"),
    # --- packing --------------------------------------------------------------------------------------------------
    Mutant("branch_positions_shifted", "aloe_jax/train/inputs/packing.py",
           "positions += list(range(start - 1, start - 1 + len(branch)))",
           "positions += list(range(start, start + len(branch)))",
           (_PACKING,), "side branch RoPE positions one past the branch point"),
    Mutant("branch_sees_its_prompt_token_twice", "aloe_jax/train/inputs/packing.py",
           "prefix += [start - 1] * len(branch)", "prefix += [start] * len(branch)",
           (_PACKING,), "a branch also sees the spine token it copies"),
    Mutant("tree_mask_off_by_one", "aloe_jax/models/attention.py",
           "(k_index[None, None, :] < q_prefix[:, :, None])", "(k_index[None, None, :] <= q_prefix[:, :, None])",
           (_PACKING,), "tree attention mask: a branch token sees one spine token too many"),
    Mutant("online_softmax_denominator_not_rescaled", "aloe_jax/models/attention.py",
           "l = l * correction + jnp.sum(p, axis=-1)", "l = l + jnp.sum(p, axis=-1)",
           ("tests/test_attention.py::test_blockwise_kernel_equals_dense_on_tree_masks_forward_and_gradient",),
           "blockwise attention forgets to rescale the running softmax denominator when the running max grows"),
    Mutant("history_always_preferred", "aloe_jax/conversation/records.py",
           "return [(t.user, t.reply(t.continued)) for t in turns]",
           "return [(t.user, t.preferred) for t in turns]",
           (_PACKING,), "history follows the preferred reply even where the chat continued with the rejected one"),
    # --- RoPE and the model's config ------------------------------------------------------------------------------
    Mutant("rope_medium_band_weights_swapped", "aloe_jax/models/rope.py",
           "smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled",
           "smoothed = smooth * scaled / s.factor + (1 - smooth) * scaled",
           (_THREE_BANDS,), "Llama 3.1 RoPE: medium-band interpolation weights swapped"),
    Mutant("rope_high_band_smoothed", "aloe_jax/models/rope.py",
           "is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)",
           "is_medium = wavelen <= low_freq_wavelen",
           (_THREE_BANDS,), "Llama 3.1 RoPE: short wavelengths interpolated instead of kept"),
    Mutant("rope_low_band_not_slowed", "aloe_jax/models/rope.py",
           "np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)",
           "np.where(wavelen > low_freq_wavelen, inv_freq, inv_freq)",
           (_THREE_BANDS,), "Llama 3.1 RoPE: long wavelengths not slowed by the factor"),
    Mutant("rope_rotation_reversed", "aloe_jax/models/rope.py",
           "rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)",
           "rotated = jnp.concatenate([x32[..., half:], -x32[..., :half]], axis=-1)",
           (_LOGITS_PARITY,), "rotate-half with the sign on the wrong half (rotation the other way)"),
    Mutant("rope_theta_not_read", "aloe_jax/models/config.py",
           'theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))',
           'theta = hf.get("rope_theta", 10000.0)',
           (_LOGITS_PARITY,), "RoPE theta of transformers-5 configs (rope_parameters) ignored"),
    Mutant("export_drops_rope_scaling", "aloe_jax/models/config.py",
           'rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, **dataclasses.asdict(self.rope_scaling)}',
           'rope = {"rope_type": "default", "rope_theta": self.rope_theta}',
           (_EXPORT,), "exported config.json loses the Llama 3.1 RoPE scaling"),
    Mutant("export_attention_out_untransposed", "aloe_jax/models/weights.py",
           '"linear_out": (lambda w, shape: w.T.reshape(shape), lambda p: p.reshape(-1, p.shape[-1]).T),',
           '"linear_out": (lambda w, shape: w.T.reshape(shape), lambda p: p.reshape(-1, p.shape[-1])),',
           (_EXPORT,), "export writes o_proj in our [in, out] layout instead of PyTorch's [out, in]"),
    # --- sampler --------------------------------------------------------------------------------------------------
    Mutant("only_first_stop_id", "aloe_jax/sampling/sampler.py",
           "is_stop = jnp.any(loop.token[:, None] == stop_ids[None, :], axis=-1)",
           "is_stop = jnp.any(loop.token[:, None] == stop_ids[None, :1], axis=-1)",
           (_SAMPLER,), "generation stops on the first stop id only"),
    Mutant("budget_off_by_one", "aloe_jax/sampling/sampler.py",
           "done = loop.done | stopped | (count >= budgets)", "done = loop.done | stopped | (count > budgets)",
           (_SAMPLER,), "each row generates one token past its budget"),
    Mutant("stop_token_kept_in_reply", "aloe_jax/sampling/sampler.py",
           "kept = count - stopped", "kept = count",
           (_SAMPLER,), "the stop token is returned as part of the reply"),
    Mutant("decode_positions_ignore_left_padding", "aloe_jax/sampling/sampler.py",
           "(lengths + loop.step)[:, None]", "(prompt_len + loop.step)[:, None]",
           (_SAMPLER,), "generated tokens get positions counted from the padded prompt start"),
    Mutant("top_k_keeps_one_less", "aloe_jax/sampling/sampler.py",
           "threshold = candidates[:, -1]", "threshold = candidates[:, -2]",
           (_SAMPLER,), "top-k keeps k - 1 tokens"),
    Mutant("top_p_after_top_k_not_renormalised", "aloe_jax/sampling/sampler.py",
           "_nucleus_threshold(candidates, jax.nn.logsumexp(candidates, axis=-1), top_p)[0]",
           "_nucleus_threshold(candidates, jax.nn.logsumexp(logits, axis=-1), top_p)[0]",
           (_SAMPLER,), "top-p after top-k measures mass over the whole vocabulary"),
    Mutant("nucleus_drops_the_crossing_token", "aloe_jax/sampling/sampler.py",
           "keep = mass - probs < top_p", "keep = mass < top_p",
           (_SAMPLER,), "top-p leaves out the token that brings the mass to p"),
    Mutant("temperature_multiplies", "aloe_jax/sampling/sampler.py",
           "logits = logits / temperature", "logits = logits * temperature",
           (_SAMPLER,), "temperature multiplies the logits"),
    Mutant("option_scores_shifted", "aloe_jax/sampling/scoring.py",
           "where = jnp.minimum(starts[:, None] + jnp.arange(targets.shape[1]), tokens.shape[1] - 1)",
           "where = jnp.minimum(starts[:, None] + 1 + jnp.arange(targets.shape[1]), tokens.shape[1] - 1)",
           (f"{_SAMPLER}::test_option_scores_equal_full_forward_log_probs",),
           "option tokens scored from the position after the one that predicts them"),
    # --- ALOE metrics, judge and report ---------------------------------------------------------------------------
    Mutant("al_counts_missing_as_zero", "aloe_jax/eval/metrics.py",
           "al = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)",
           "al = np.where(counts > 0, sums / scores.shape[0], np.nan)",
           (_METRICS,), "AL(k) averages over all cases, missing scores counting 0"),
    Mutant("fit_over_k_from_zero", "aloe_jax/eval/metrics.py",
           "k = np.arange(1, len(curve) + 1, dtype=np.float64)", "k = np.arange(len(curve), dtype=np.float64)",
           (_METRICS,), "line fit over k = 0..K-1 (the intercept moves by one slope)"),
    Mutant("r2_inverted", "aloe_jax/eval/metrics.py",
           "r2 = 1.0 - residual / total if total > 0 else np.nan", "r2 = residual / total if total > 0 else np.nan",
           (_METRICS,), "R² reports the unexplained fraction"),
    Mutant("n_al_not_min_max", "aloe_jax/eval/metrics.py",
           "return (curve - low) / (high - low)", "return (curve - low) / high",
           (_METRICS,), "N-AL divides by the maximum instead of the range"),
    Mutant("paired_difference_reversed", "aloe_jax/eval/metrics.py",
           'return np.array([b["avg"] - a["avg"], b["slope"] - a["slope"]])',
           'return np.array([a["avg"] - b["avg"], a["slope"] - b["slope"]])',
           (_METRICS,), "paired differences are A - B instead of B - A"),
    # --- the conversation engine under tree generation and the evaluation ---------------------------------------
    Mutant("resume_takes_turns_out_of_sequence", "aloe_jax/conversation/engine.py",
           "if history is not None and turn == self.script.first_turn + len(history):",
           "if history is not None and turn is not None:",
           (f"{_CONVERSATION}::test_the_log_keeps_only_the_next_turn_in_sequence",),
           "resume counts duplicate and out-of-sequence records as committed turns"),
    Mutant("fingerprint_ignores_changed_settings", "aloe_jax/conversation/engine.py",
           "if k not in fingerprint.may_change and saved.get(k) != card.get(k))",
           "if k in fingerprint.may_change and saved.get(k) != card.get(k))",
           (f"{_CONVERSATION}::test_a_folder_of_another_run_is_refused_in_one_line", "tests/test_trees.py"),
           "a run folder of another run is resumed (settings mixed) and one that merely grew is refused"),
    Mutant("judge_retry_same_seed", "aloe_jax/conversation/judging.py",
           'params.model_copy(update={"seed": params.seed + attempt})', "params",
           (f"{_CONVERSATION}::test_the_shared_judge_falls_back_to_text_retries_and_records_none",),
           "a text judge's retries reuse the first attempt's seed"),
    Mutant("batches_cut_from_unfinished_conversations", "aloe_jax/conversation/engine.py",
           "batch = list(zip(ids[begin:begin + size], conversations[begin:begin + size]))",
           "batch = [(i, c) for i, c in zip(ids, conversations) if len(done[i]) < self.turns][:size] "
           "if begin == 0 else []",
           (f"{_CONVERSATION}::test_batches_are_cut_from_all_conversations_not_from_the_unfinished_ones",),
           "after a resume, batches mix conversations that an uninterrupted run batches apart"),
    Mutant("judge_accepts_any_digit", "aloe_jax/eval/judge.py",
           r"(?:(?:score|rating)\s*[:=]?\s*)?([1-5])", r"(?:(?:score|rating)\s*[:=]?\s*)?([0-9])",
           ("tests/test_eval_judge.py::test_parse_score",), "judge scores 0 and 6..9 are accepted"),
    Mutant("judge_score_found_anywhere", "aloe_jax/eval/judge.py",
           "match = _SCORE_PATTERN.fullmatch(", "match = _SCORE_PATTERN.search(",
           ("tests/test_eval_judge.py::test_parse_score",), "a digit anywhere in the judge's answer is its score"),
    Mutant("expected_score_not_renormalised", "aloe_jax/eval/judge.py",
           "probs = weights / weights.sum()", "probs = weights",
           ("tests/test_eval_judge.py::test_verdict_from_option_logprobs",),
           "expected score weights options by unnormalised probabilities"),
    Mutant("al_plot_from_turn_zero", "aloe_jax/eval/report.py",
           "k = np.arange(1, len(summary.al) + 1)", "k = np.arange(len(summary.al))",
           ("tests/test_eval_runner.py::test_al_curve_plot_draws_turn_k_at_x_k",), "AL(k) plotted at k = 0..K-1"),
    # --- optimizer, checkpoints, data resume ----------------------------------------------------------------------
    Mutant("weight_decay_on_vectors", "aloe_jax/train/optim.py",
           "lambda p: p.ndim > 1", "lambda p: p.ndim >= 1",
           (f"{_TRAINER}::test_schedule_warms_up_then_decays_and_weight_decay_skips_vectors",),
           "weight decay applied to norm scales and biases"),
    Mutant("linear_decay_over_all_steps", "aloe_jax/train/optim.py",
           "optax.linear_schedule(cfg.lr, end, max(total_steps - warmup, 1))",
           "optax.linear_schedule(cfg.lr, end, max(total_steps, 1))",
           (f"{_TRAINER}::test_schedule_warms_up_then_decays_and_weight_decay_skips_vectors",),
           "linear decay stretched over the warmup steps too"),
    Mutant("checkpoint_rng_not_restored", "aloe_jax/train/checkpoint.py",
           'restored["opt_state"], restored["loop"]["rng"])', 'restored["opt_state"], jax.random.PRNGKey(0))',
           (_CHECKPOINT,), "a resumed run restarts its RNG stream"),
    Mutant("checkpoint_data_position_not_restored", "aloe_jax/train/checkpoint.py",
           'items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)', "pass",
           (_CHECKPOINT,), "a resumed run reads its data from the start again"),
    Mutant("checkpoint_step_folder_loads_latest", "aloe_jax/models/run_folder.py",
           "return _parent(parent), int(name)", "return _parent(parent), None",
           (_CHECKPOINT,), "checkpoints/<step> loads the latest step instead"),
    Mutant("shuffle_ignores_seed", "aloe_jax/train/inputs/pipeline.py",
           "ds = ds.shuffle(seed=cfg.seed)", "ds = ds.shuffle(seed=0)",
           (f"{_PIPELINE}::test_shuffle_is_deterministic_by_seed_and_epochs_cover_every_tree",),
           "data order does not depend on the configured seed"),
    Mutant("tail_batch_dropped", "aloe_jax/train/inputs/pipeline.py",
           "self._length = math.ceil(self._size / multiple) * multiple",
           "self._length = self._size // multiple * multiple",
           (f"{_PIPELINE}::test_shuffle_is_deterministic_by_seed_and_epochs_cover_every_tree",),
           "the last, partial global batch is silently dropped"),
    Mutant("every_process_reads_process_0_rows", "aloe_jax/train/inputs/pipeline.py",
           "mine = local_batches[index::count]", "mine = local_batches[::count]",
           (f"{_PIPELINE}::test_two_processes_read_disjoint_halves_of_the_one_process_batch",),
           "multi-host: every process trains on process 0's rows"),
    Mutant("max_pairs_cut_not_reported", "aloe_jax/train/inputs/pipeline.py",
           "return _Item(packed, turns_cut=packed.turns_cut + extra_turns)",
           "return _Item(packed, turns_cut=packed.turns_cut)",
           (f"{_PIPELINE}::test_cut_report_counts_turns_cut_and_trees_dropped",),
           "turns cut by max_pairs are missing from the packing report"),
    # --- memory-efficient training paths (issue 16): blockwise attention, stacked layers, chunked log-probs, remat --
    Mutant("blockwise_skips_diagonal_block", "aloe_jax/models/attention.py",
           "m, l, acc = jax.lax.fori_loop(0, i + 1, key_block, init)",
           "m, l, acc = jax.lax.fori_loop(0, i, key_block, init)",
           (_ATTENTION_KERNEL,), "blockwise forward never visits the diagonal block (queries lose their own block)"),
    Mutant("blockwise_backward_skips_diagonal", "aloe_jax/models/attention.py",
           "dq, dk_j, dv_j = jax.lax.fori_loop(j, n, query_block, (dq, zeros, zeros))",
           "dq, dk_j, dv_j = jax.lax.fori_loop(j + 1, n, query_block, (dq, zeros, zeros))",
           (_ATTENTION_KERNEL,), "blockwise backward drops the diagonal block's gradient"),
    Mutant("blockwise_backward_delta_missing", "aloe_jax/models/attention.py",
           "ds = (p * (dp - delta[i][..., None]) * scale).astype(dtype)",
           "ds = (p * dp * scale).astype(dtype)",
           (_ATTENTION_KERNEL,), "softmax backward without the rowsum(dO * O) term"),
    Mutant("blockwise_padding_keys_visible", "aloe_jax/models/attention.py",
           "jnp.pad(mask.segment, ((0, 0), (0, pad)), constant_values=-1)",
           "jnp.pad(mask.segment, ((0, 0), (0, pad)), constant_values=0)",
           (_ATTENTION_KERNEL,), "keys added to pad T to a block multiple join the spine and are attended",
           equivalent="the padding keys sit after every real query, so the causal order already hides them from "
                      "all real queries; only padding queries (whose outputs are never used) could see them"),
    Mutant("auto_attention_never_blockwise", "aloe_jax/models/decoder.py",
           'blockwise = self.kind == "blockwise" or (self.kind == "auto" and x.shape[1] > self.block)',
           'blockwise = self.kind == "auto" and x.shape[1] > self.block',
           (_WHAT_RUNS,), "attention='blockwise' silently runs dense (the memory saving is lost)"),
    Mutant("stacked_layers_in_wrong_order", "aloe_jax/models/decoder.py",
           'value = jnp.stack([flat[("layers", i, *rest)][...] for i in range(num_layers)])',
           'value = jnp.stack([flat[("layers", i, *rest)][...] for i in reversed(range(num_layers))])',
           (_STACKED,), "scan_layers runs the layers in reverse order"),
    Mutant("unstack_keeps_layer_axis", "aloe_jax/models/decoder.py",
           'out += [(("layers", i, *path[1:]), v.replace(value[i], logical_axes=axes)) for i in range(value.shape[0])]',
           'out += [(("layers", i, *path[1:]), v.replace(value[0], logical_axes=axes)) for i in range(value.shape[0])]',
           (_STACKED,), "a scan run's checkpoint loads every layer as the first one"),
    Mutant("chunked_logprobs_labels_shifted", "aloe_jax/models/decoder.py",
           "l_chunks = labels.reshape(b, n, chunk).swapaxes(0, 1)",
           "l_chunks = jnp.roll(labels, 1, axis=1).reshape(b, n, chunk).swapaxes(0, 1)",
           ("tests/test_attention.py::test_blockwise_attention_and_chunked_logprobs_equal_dense_for_every_family",),
           "chunked label log-probs read each label one position late"),
    Mutant("checkpoint_layout_not_recorded", "aloe_jax/models/run_folder.py",
           '"scan_layers": scan_layers}', '"scan_layers": False}',
           (_STACKED,), "a scan run's folder does not say its layers are stacked: it cannot load as a model"),
    Mutant("remat_policy_ignored_under_scan", "aloe_jax/models/decoder.py",
           "block = _block_fn(graphdef, self.options.remat, in_scan=True)",
           'block = _block_fn(graphdef, "none", in_scan=True)',
           (_WHAT_RUNS,), "remat is silently off with scan_layers"),
    # --- tokenizer masks and stop tokens --------------------------------------------------------------------------
    Mutant("stop_ids_miss_end_of_turn", "aloe_jax/models/tokenizer.py",
           '_END_TOKENS = ("<|im_end|>", "<|eot_id|>",', '_END_TOKENS = ("<|eot_id|>",',
           ("tests/test_tokenizer.py",), "ChatML's <|im_end|> does not end a reply"),
    Mutant("mask_span_count_unchecked", "aloe_jax/models/tokenizer.py",
           "if _masked_runs(mask) != replies:", "if _masked_runs(mask) < replies:",
           ("tests/test_tokenizer.py",), "an assistant mask with extra spans is accepted"),
]
