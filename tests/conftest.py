"""Shared test setup: 8 forced CPU devices (set before jax is imported anywhere) and tiny HF models per family."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# libtpu is installed for `aloe-jax compile` (the tpu extra): keep JAX from probing for TPU chips in every process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

from tests import tiny_models  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
    """name → folder of a tiny random HF model (config.json + model.safetensors) saved by transformers."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: tiny_models.save_tiny_model(name, root / name) for name in tiny_models.FAMILIES}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator():
    """A gcp-storage-emulator on loopback with bucket `test`; the environment points every GCS client at it.

    Yields the bucket URL prefix (`gs://test`). Fails (never skips) when the emulator is not installed: CI installs it.
    """
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    exe = shutil.which("gcp-storage-emulator") or str(pathlib.Path(sys.executable).parent / "gcp-storage-emulator")
    port = _free_port()
    proc = subprocess.Popen([exe, "start", "--host=127.0.0.1", f"--port={port}", "--default-bucket=test",
                             "--in-memory"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    env = {
        "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",
        "FSSPEC_GCS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_CLOUD_PROJECT": "test",
        "GCE_METADATA_HOST": "127.0.0.1:1", "GCE_METADATA_IP": "127.0.0.1:1", "NO_GCE_CHECK": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except Exception:
            time.sleep(0.1)
    from aloe_jax.core import storage

    storage._client.cache_clear()
    yield "gs://test"
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    storage._client.cache_clear()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The embedded SmolLM2 tokenizer (with our chat template)."""
    from aloe_jax.models import gguf

    return gguf.read_gguf(gguf.smollm2_gguf_path())[2]


@pytest.fixture(scope="session")
def tiny_chat_engine(smollm2_tokenizer):
    """A ChatEngine on a tiny random Llama sized to the SmolLM2 vocabulary: real chat templates and stop tokens, fast
    decoding, deterministic (nonsense) replies. Untied embeddings: with tied ones the random model's greedy choice is
    "\n" for every prompt, which would make transcript comparisons pass vacuously."""
    from flax import nnx

    from aloe_jax.models.config import config_from_hf
    from aloe_jax.models.decoder import Decoder
    from aloe_jax.sampling.chat import ChatEngine

    cfg = config_from_hf(dict(model_type="llama", vocab_size=len(smollm2_tokenizer), hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=False))
    return ChatEngine(Decoder(cfg, nnx.Rngs(0)), smollm2_tokenizer)
