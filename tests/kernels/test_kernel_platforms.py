"""Which rejection implementation each platform gets, and that the NKI module is harmless
where the Neuron SDK is not installed."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO

from jaxspec import kernels
from jaxspec.decode.rejection import REFERENCE
from jaxspec.kernels import nki_rejection


def test_cpu_and_gpu_use_the_reference():
    assert kernels.for_platform("cpu") is REFERENCE
    assert kernels.for_platform("gpu") is REFERENCE


def test_neuron_uses_nki_exactly_when_it_imports():
    if nki_rejection.AVAILABLE:
        assert kernels.for_platform("neuron") is nki_rejection.NKI
        assert set(kernels.IMPLEMENTATIONS) == {"reference", "nki"}
    else:
        assert kernels.for_platform("neuron") is REFERENCE
        assert set(kernels.IMPLEMENTATIONS) == {"reference"}
        assert nki_rejection.NKI is None and nki_rejection.sampled_kernel is None


@pytest.mark.skipif(nki_rejection.AVAILABLE, reason="nki is installed here")
def test_wrappers_explain_a_missing_nki():
    with pytest.raises(RuntimeError, match="real nki package"):
        nki_rejection.sampled(None, None, None, None)
    with pytest.raises(RuntimeError, match="real nki package"):
        nki_rejection.greedy_from_logits(None, None)


def test_neuron_falls_back_when_nki_cannot_import():
    """In a fresh interpreter where `import nki` fails (even if the SDK is installed), the
    package imports and "neuron" gets the reference."""
    code = ("import sys; sys.modules['nki'] = None\n"
            "from jaxspec import kernels\n"
            "from jaxspec.decode.rejection import REFERENCE\n"
            "assert kernels.for_platform('neuron') is REFERENCE\n"
            "assert list(kernels.IMPLEMENTATIONS) == ['reference']\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_logical_cores_follow_the_runtime(monkeypatch):
    monkeypatch.delenv("NEURON_LOGICAL_NC_CONFIG", raising=False)
    assert nki_rejection.logical_cores() == 2  # Trn2's default
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "1")
    assert nki_rejection.logical_cores() == 1
