"""The laid-out params cache (jaxspec.checkpoint.mapped): a later CPU load maps, without a
copy, the params an earlier one restored and laid out."""

from __future__ import annotations

import glob
import os
import time

import jax
import numpy as np
import pytest
from helpers import tiny_hf_model

import jaxspec
from jaxspec import paths
from jaxspec.checkpoint import convert, load_model, mapped, store


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("mapped")
    return convert(tiny_hf_model("llama", folder), str(folder / "tiny"))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(mapped.ENV, "1")
    return str(tmp_path / "cache" / "params")


def load_saved(path: str, **kwargs):
    model = load_model(path, **kwargs)
    mapped.wait()
    return model


def files(cache: str) -> list[str]:
    return sorted(glob.glob(os.path.join(cache, "*.bin")))


def greedy(model) -> list[list[int]]:
    return jaxspec.SpeculativeDecoder(model, None).generate([[1, 2, 3, 4]],
                                                            max_new_tokens=6).tokens


def assert_same_params(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_a_second_load_maps_what_the_first_laid_out(converted, cache, monkeypatch):
    first = load_saved(converted)
    [path] = files(cache)

    def no_restore(*args, **kwargs):
        raise AssertionError("restored although the laid-out params were saved")

    monkeypatch.setattr(store, "restore_params", no_restore)
    second = load_model(converted)
    assert second.layout == first.layout and second.tokenizer is not None
    assert_same_params(first.params, second.params)
    with open("/proc/self/maps", encoding="utf-8") as f:
        assert path in f.read()  # used in place: mapped, not read into memory
    assert greedy(second) == greedy(first)


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_a_damaged_file_is_removed_and_the_checkpoint_restored(converted, cache, damage):
    first = load_saved(converted)
    [path] = files(cache)
    size = os.path.getsize(path)
    if damage == "truncated":
        os.truncate(path, size // 2)  # mapped as it is, its last leaves would fault when read
    else:
        with open(path, "r+b") as f:
            f.write(os.urandom(4096))  # the header
    again = load_saved(converted)
    assert_same_params(first.params, again.params)
    assert files(cache) == [path] and os.path.getsize(path) == size  # saved again


def test_each_dtype_and_version_of_the_checkpoint_has_its_own_file(converted, cache):
    load_saved(converted)
    load_saved(converted, dtype="bfloat16")
    assert len(files(cache)) == 2
    data = max(glob.glob(os.path.join(converted, "params", "**", "*"), recursive=True),
               key=os.path.getsize)
    later = os.stat(data).st_mtime_ns + 10**9
    os.utime(data, ns=(later, later))  # the checkpoint written again
    load_saved(converted)
    assert len(files(cache)) == 3


def test_turned_off_or_too_large_nothing_is_saved(converted, cache, monkeypatch):
    monkeypatch.setenv(mapped.ENV, "0")
    load_saved(converted)
    assert not os.path.exists(cache) or not files(cache)
    monkeypatch.setenv(mapped.ENV, "1")
    monkeypatch.setattr(mapped, "MAX_BYTES", 1000)  # the tiny model's params: ~70 KB
    load_saved(converted)
    assert not files(cache)


def test_saving_prunes_stale_temporary_files_and_keeps_fresh_ones(converted, cache):
    os.makedirs(cache)
    stale, fresh = (os.path.join(cache, f".x.bin{paths.TEMPORARY}{n}") for n in ("a", "b"))
    for name in (stale, fresh):
        open(name, "wb").close()
    old = time.time() - paths.STALE_SECONDS - 60
    os.utime(stale, (old, old))  # left by a process that died while writing it
    load_saved(converted)
    assert not os.path.exists(stale) and os.path.exists(fresh)


def test_a_failed_write_leaves_no_file(tmp_path):
    def fail(f):
        f.write(b"part of it")
        raise OSError("disk full")

    with pytest.raises(OSError):
        paths.write_atomically(str(tmp_path / "x.bin"), fail)
    assert os.listdir(tmp_path) == []
