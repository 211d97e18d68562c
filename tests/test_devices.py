"""Backend selection (jaxspec.devices): auto, missing platforms, the neuron defaults, and that an
explicit device gives the same tokens as JAX's default placement.

This machine has only a CPU: "gpu" and "neuron" are the missing platforms here. A second,
forced CPU device (a subprocess with --xla_force_host_platform_device_count=2, started with the
module's first test) checks that the params and the compiled programs' inputs and outputs
really go to the device asked for.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from helpers import REPO, UNOPTIMIZED_XLA, perturbed, tiny_model

import jaxspec
from jaxspec import devices, kernels
from jaxspec import generate as cli
from jaxspec.checkpoint import load_model
from jaxspec.errors import UserError

MISSING = ("gpu", "neuron")


def one_line_naming_cpu(message: str, name: str) -> None:
    assert "\n" not in message.rstrip("\n"), message
    assert name in message and "cpu" in message, message


def test_auto_resolves_to_cpu():
    device = devices.resolve("auto")
    assert device.platform == "cpu"
    assert devices.resolve("cpu") == device
    assert devices.resolve(None) is None  # the default backend, nothing placed
    assert devices.resolve(device) is device
    assert devices.available() == ["cpu"]
    assert devices.platform(None) == "cpu"


def test_canonical_platform_names():
    assert [devices.canonical(p) for p in ("cuda", "rocm", "gpu", "cpu", "neuron")] == [
        "gpu", "gpu", "gpu", "cpu", "neuron"]


def test_unknown_device_name():
    with pytest.raises(UserError, match="one of auto, cpu, gpu, neuron"):
        devices.resolve("tpu")


@pytest.mark.parametrize("name", MISSING)
def test_missing_device_api(name):
    with pytest.raises(UserError) as e:
        jaxspec.SpeculativeDecoder(tiny_model(), device=name)
    one_line_naming_cpu(str(e.value), name)
    with pytest.raises(UserError) as e:  # before the (missing) source is even looked at
        load_model("/nonexistent/model", device=name)
    one_line_naming_cpu(str(e.value), name)


@pytest.mark.parametrize("name", MISSING)
def test_missing_device_cli(name, tmp_path, capsys):
    code = cli.main(["hi", "--model", str(tmp_path), "--device", name])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    one_line_naming_cpu(err, name)


def test_device_flag_choices(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["hi", "--device", "tpu"])
    assert e.value.code == 2
    assert "--device" in capsys.readouterr().err


def test_neuron_defaults(monkeypatch):
    """On the neuron platform: static mode, the rbg PRNG, the neuron rejection kernel."""
    assert devices.loop_defaults("cpu", None, None) == ("dynamic", None)
    assert devices.loop_defaults("gpu", "static", "rbg") == ("static", "rbg")
    assert devices.loop_defaults("neuron", None, None) == ("static", "rbg")
    assert devices.loop_defaults("neuron", "static", "threefry2x32") == ("static",
                                                                          "threefry2x32")
    for mode in ("dynamic", "chunked"):  # while loops
        with pytest.raises(UserError, match="static"):
            devices.loop_defaults("neuron", mode, None)
    assert [devices.streaming_mode(p) for p in ("cpu", "gpu", "neuron")] == [
        "chunked", "chunked", "static"]
    monkeypatch.setattr(devices, "platform", lambda device: "neuron")
    decoder = jaxspec.SpeculativeDecoder(tiny_model(), "ngram", num_speculative_tokens=2)
    assert (decoder.mode, decoder.prng_impl) == ("static", "rbg")
    assert decoder.rejection == kernels.for_platform("neuron")
    with pytest.raises(UserError, match="static"):
        jaxspec.SpeculativeDecoder(tiny_model(), mode="dynamic")


def _committed_to(tree, device) -> bool:
    return all(leaf.committed and leaf.devices() == {device} for leaf in jax.tree.leaves(tree))


PROMPTS = [[1, 2, 3, 4], [7, 8]]
SAMPLING = {"temperature": 0.8, "top_p": 0.9, "seed": 3, "max_new_tokens": 10}
SPECULATIVE = {"num_speculative_tokens": 2, "mode": "static"}


@functools.cache
def target_and_draft():
    target = tiny_model(eos=(5,))
    return target, perturbed(target, noise=0.05)


SECOND_CPU = textwrap.dedent("""
    import json, pickle, sys
    import jax, jaxspec
    from jaxspec.models.loaded import Model
    with open(sys.argv[1], "rb") as f:
        config, target_params, draft_params, prompts, sampling, speculative = pickle.load(f)
    second = jax.devices("cpu")[1]
    decoder = jaxspec.SpeculativeDecoder(Model(config, target_params), Model(config, draft_params),
                                         device=second, **speculative)
    tokens = decoder.generate(prompts, **sampling).tokens
    for leaf in jax.tree.leaves((decoder.target.params, decoder.draft_params)):
        assert leaf.devices() == {second}, leaf.devices()
    for pending in decoder._compiled.values():
        program = pending.result()
        compiled = getattr(program, "compiled", program)  # program_cache.Program wraps it
        shardings = jax.tree.leaves((compiled.input_shardings, compiled.output_shardings))
        assert {d for s in shardings for d in s.device_set} == {second}, shardings
    print(json.dumps(tokens))
""")


@pytest.fixture(scope="module", autouse=True)
def second_device_run(tmp_path_factory):
    """The speculative run on a second (forced) CPU device, in a subprocess started with the
    module's first test so that it runs while the others do."""
    target, draft = target_and_draft()
    path = tmp_path_factory.mktemp("second_device") / "inputs.pkl"
    to_numpy = functools.partial(jax.tree.map, np.asarray)
    with open(path, "wb") as f:
        pickle.dump((target.config, to_numpy(target.params), to_numpy(draft.params), PROMPTS,
                     SAMPLING, SPECULATIVE), f)
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {UNOPTIMIZED_XLA}",
               JAXSPEC_COMPILE_CACHE="0", PYTHONPATH=REPO)
    process = subprocess.Popen([sys.executable, "-c", SECOND_CPU, str(path)], env=env,
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    yield process
    if process.poll() is None:
        process.kill()
        process.communicate()


@pytest.fixture(scope="module")
def expected_tokens() -> list[list[int]]:
    """Sampled speculative tokens (model draft, γ = 2, static mode) on JAX's default device."""
    target, draft = target_and_draft()
    return jaxspec.SpeculativeDecoder(target, draft, **SPECULATIVE).generate(
        PROMPTS, **SAMPLING).tokens


def test_cpu_device_gives_the_same_tokens(expected_tokens):
    target, draft = target_and_draft()
    cpu = jax.devices("cpu")[0]
    decoder = jaxspec.SpeculativeDecoder(target, draft, device="cpu", **SPECULATIVE)
    assert _committed_to(decoder.target.params, cpu)
    assert _committed_to(decoder.draft_params, cpu)
    assert decoder.generate(PROMPTS, **SAMPLING).tokens == expected_tokens


def test_programs_run_on_the_device_asked_for(second_device_run, expected_tokens):
    """A second CPU device: params, compiled programs and results all on it, same tokens."""
    out, err = second_device_run.communicate(timeout=300)
    assert second_device_run.returncode == 0, err[-3000:]
    assert json.loads(out) == expected_tokens
