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
    # Retrained in place: same names and sizes, new values. Loading the gs:// folder again must use the new weights.
    from safetensors.numpy import load_file, save_file

    retrained = {name: array * 2 for name, array in load_file(str(folder / "model.safetensors")).items()}
    save_file(retrained, str(tmp_path / "model.safetensors"))
    storage.write_bytes(f"{remote}/model.safetensors", (tmp_path / "model.safetensors").read_bytes())
    reloaded = load_hf_model(remote, read_hf_config(remote))
    for name, array in hf_tensors(reloaded).items():
        np.testing.assert_array_equal(array, retrained[name])


def test_atomic_writes_get_umask_permissions(tmp_path):
    import os

    from aloe_jax.core import storage

    old = os.umask(0o022)
    try:
        storage.write_text(tmp_path / "report.md", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644


def test_localize_fetches_an_overwritten_object_again(gcs_emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("ALOE_JAX_CACHE", str(tmp_path / "cache"))
    file, folder = f"{gcs_emulator}/fresh/weights.bin", f"{gcs_emulator}/fresh/run"
    storage.write_bytes(file, b"weights-v1")
    storage.write_bytes(f"{folder}/model.safetensors", b"weights-v1")
    storage.write_bytes(f"{folder}/config.json", b"{}")
    assert open(storage.localize(file), "rb").read() == b"weights-v1"
    local_folder = storage.localize(folder)
    assert open(f"{local_folder}/model.safetensors", "rb").read() == b"weights-v1"
    # Retrained weights of one model have the same size: only the object's generation tells them apart.
    storage.write_bytes(file, b"weights-v2")
    storage.write_bytes(f"{folder}/model.safetensors", b"weights-v2")
    assert open(storage.localize(file), "rb").read() == b"weights-v2"
    assert storage.localize(folder) == local_folder
    assert open(f"{local_folder}/model.safetensors", "rb").read() == b"weights-v2"
    assert open(f"{local_folder}/config.json", "rb").read() == b"{}"


def test_localize_refuses_object_names_that_leave_the_cache_folder(tmp_path, monkeypatch):
    import types

    import pytest

    from aloe_jax.core.errors import AloeError

    monkeypatch.setenv("ALOE_JAX_CACHE", str(tmp_path / "cache"))
    # The emulator drops the connection on such names, so a stand-in client lists them (real GCS stores them).
    for name in ("run/a/../../../../outside.txt", "run//etc/outside.txt"):
        blob = types.SimpleNamespace(name=name, generation=1, crc32c="x", md5_hash="y",
                                     download_to_filename=lambda f: open(f, "wb").write(b"x"))
        bucket = types.SimpleNamespace(get_blob=lambda key: None)
        client = types.SimpleNamespace(bucket=lambda b: bucket, list_blobs=lambda b, prefix, items=[blob]: items)
        monkeypatch.setattr(storage, "_client", lambda: client)
        with pytest.raises(AloeError, match="outside the cache folder"):
            storage.localize("gs://test/run")
    assert list(tmp_path.rglob("*.txt")) == []
