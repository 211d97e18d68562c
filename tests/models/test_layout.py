"""The layout policy: one decision per backend, an override for testing, and the suites that
must pass with the accelerator layouts forced on CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO, tiny_model

from jaxspec.kernels import cpu_matmul
from jaxspec.models import layout

# the parity, loop and GGUF tests, rerun with JAXSPEC_LAYOUT=accelerator
ACCELERATOR_SUITES = ("tests/models/test_parity.py", "tests/models/test_decoder.py",
                      "tests/decode/test_loop.py", "tests/checkpoint/test_gguf.py")


@pytest.mark.parametrize("platform,expected", [
    ("cpu", layout.CPU), ("gpu", layout.ACCELERATOR), ("cuda", layout.ACCELERATOR),
    ("neuron", layout.ACCELERATOR), ("tpu", layout.ACCELERATOR)])
def test_policy_per_platform(platform, expected, monkeypatch):
    monkeypatch.delenv(layout.ENV, raising=False)
    assert layout.for_platform(platform) == expected


def test_environment_override(monkeypatch):
    monkeypatch.setenv(layout.ENV, "accelerator")
    assert layout.for_platform("cpu") == layout.ACCELERATOR
    monkeypatch.setenv(layout.ENV, "cpu")
    assert layout.for_platform("neuron") == layout.CPU
    monkeypatch.setenv(layout.ENV, "tpu-ish")
    with pytest.raises(ValueError, match=layout.ENV):
        layout.for_platform("cpu")


def test_apply_adds_or_removes_the_output_copy_of_tied_models_only():
    embed = jnp.arange(12.0).reshape(4, 3)  # [V, D]
    tied = {"embed": embed}
    with_copy = layout.apply(layout.CPU_XLA, tied, tied=True)
    np.testing.assert_array_equal(with_copy["lm_head"], embed.T)
    assert layout.apply(layout.ACCELERATOR, with_copy, tied=True).keys() == {"embed"}
    again = layout.apply(layout.CPU_XLA, with_copy, tied=True)
    assert again["lm_head"] is with_copy["lm_head"]  # already in the layout: nothing copied
    untied = {"embed": embed, "lm_head": jnp.ones((3, 4))}
    assert layout.apply(layout.ACCELERATOR, untied, tied=False)["lm_head"] is untied["lm_head"]


@pytest.mark.skipif(not cpu_matmul.available(), reason="the CPU matmul kernel is unavailable")
def test_cpu_policy_packs_fp32_and_bf16_projections_into_panels_and_back():
    params = tiny_model(layers=2, tied=True).params
    packed = layout.apply(layout.CPU, params, tied=True)
    for name in layout.PACKED:
        w = packed["layers"][1][name]
        assert isinstance(w, layout.Panels) and w.shape == params["layers"][1][name].shape
        assert w.data.shape[1:] == (w.shape[0], layout.PANEL)
        np.testing.assert_array_equal(layout.unpack(w), params["layers"][1][name])
    assert isinstance(packed["lm_head"], layout.Panels)
    assert not isinstance(packed["embed"], layout.Panels)
    assert layout.apply(layout.CPU, packed, tied=True)["lm_head"] is packed["lm_head"]
    for policy in (layout.CPU_XLA, layout.for_mesh(layout.CPU)):
        plain = layout.apply(policy, packed, tied=True)
        for name in layout.PACKED:
            np.testing.assert_array_equal(plain["layers"][0][name], params["layers"][0][name])
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    packed16 = layout.apply(layout.CPU, bf16, tied=True)
    for name in layout.PACKED:
        w = packed16["layers"][0][name]
        assert isinstance(w, layout.Panels) and w.dtype == jnp.bfloat16
        np.testing.assert_array_equal(layout.unpack(w), bf16["layers"][0][name])
    ints = {"embed": jnp.zeros((4, 3), jnp.int8), "layers": [{"wo": jnp.zeros((3, 3), jnp.int8)}]}
    assert not isinstance(layout.apply(layout.CPU, ints, tied=True)["layers"][0]["wo"],
                          layout.Panels)  # only the dtypes the kernel reads


@pytest.mark.skipif(os.environ.get(layout.ENV) == "accelerator", reason="already forced")
def test_suites_pass_with_the_accelerator_layout_forced():
    """Parity, cached decode, loop and GGUF tests with the non-CPU policy, on CPU (compiled
    without LLVM's optimizations, as the run's tiny-model tests: conftest's XLA_FLAGS), but
    for those that choose their layouts themselves (marked layouts)."""
    env = {**os.environ, layout.ENV: "accelerator"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0",
                           "-m", "not slow and not layouts", "-p", "no:cacheprovider",
                           *ACCELERATOR_SUITES],
                          cwd=REPO, env=env, capture_output=True, text=True)
    tail = done.stdout[-3000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail, tail
