"""Local and gs:// files behave the same; HF folders load from gs:// (emulator on loopback)."""

import numpy as np
import jax.numpy as jnp

from aloe_jax.core import storage
from aloe_jax.models import masks
from aloe_jax.models.config import read_hf_config
from aloe_jax.models.weights import export_hf, hf_tensors, load_hf_model


def test_local_and_gcs_read_write_list(tmp_path, gcs_emulator):
    for root in (str(tmp_path), f"{gcs_emulator}/files"):
        storage.write_text(storage.join(root, "a", "x.txt"), "hello")
        storage.write_bytes(storage.join(root, "b.bin"), b"\x00\x01")
        assert storage.read_text(storage.join(root, "a", "x.txt")) == "hello"
        assert storage.read_bytes(storage.join(root, "b.bin")) == b"\x00\x01"
        assert storage.list_dir(root) == ["a", "b.bin"]
        assert storage.exists(storage.join(root, "a")) and not storage.exists(storage.join(root, "zzz"))


def test_hf_folder_exports_to_and_loads_from_gcs(tiny_model_dirs, gcs_emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("ALOE_JAX_CACHE", str(tmp_path / "cache"))
    folder = tiny_model_dirs["qwen2"]
    model = load_hf_model(str(folder), read_hf_config(folder))
    remote = f"{gcs_emulator}/models/qwen2-tiny"
    export_hf(model, tokenizer=None, out=remote)
    assert "config.json" in storage.list_dir(remote)
    again = load_hf_model(remote, read_hf_config(remote))
    for name, array in hf_tensors(model).items():
        np.testing.assert_array_equal(array, hf_tensors(again)[name])
    valid = jnp.ones((1, 6), bool)
    tokens = jnp.arange(3, 9)[None]
    a, _ = model(tokens, masks.positions_from_valid(valid), masks.causal_mask(valid))
    b, _ = again(tokens, masks.positions_from_valid(valid), masks.causal_mask(valid))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_atomic_writes_get_umask_permissions(tmp_path):
    import os

    from aloe_jax.core import storage

    old = os.umask(0o022)
    try:
        storage.write_text(tmp_path / "report.md", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644
