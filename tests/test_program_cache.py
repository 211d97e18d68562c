"""The program cache (jaxspec.program_cache): a traced program saved by one process runs in
another without being traced again, gives the same results, and is keyed by everything its
trace depends on."""

from __future__ import annotations

import dataclasses
import enum
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (greedy_reference, script_json, successor_model, tiny_hf_model,
                     tiny_model, trained_head)

from jaxspec import SpeculativeDecoder, compile_cache, program_cache
from jaxspec.drafts.head import HeadDraft


@pytest.fixture
def cache_on(tmp_path, monkeypatch):
    """The program cache on, in a fresh $JAXSPEC_CACHE; returns its programs folder. JAX's own
    persistent cache stays off in this process (compile_cache.enable is a no-op here): once on,
    it would stay on for every later test in the process."""
    monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(compile_cache.ENV, "1")
    monkeypatch.setattr(compile_cache, "enable", lambda: None)
    monkeypatch.setattr(program_cache, "stats", {"loaded": 0, "saved": 0})
    return tmp_path / "cache" / "programs"


@dataclasses.dataclass(frozen=True)
class Spec:
    scale: float
    name: str = "a"


class Color(enum.Enum):
    RED = 1


def step(spec: Spec, x, state):
    """A small program with a static spec, a donated state and a tree output."""
    return {"y": x * spec.scale, "state": (state[0] + 1, state[1] * 2)}


def _args():
    return jnp.arange(6.0).reshape(2, 3), (jnp.int32(3), jnp.ones(4))


def test_describe_is_stable_and_refuses_what_has_no_stable_description():
    assert program_cache.describe(Spec(2.0)) == program_cache.describe(Spec(2.0))
    assert program_cache.describe(Spec(2.0)) != program_cache.describe(Spec(3.0))
    assert program_cache.describe(Spec(2.0, "b")) != program_cache.describe(Spec(2.0))
    assert program_cache.describe(step) == "test_program_cache.step"
    assert "step" in program_cache.describe(functools.partial(step, Spec(1.0)))
    assert program_cache.describe(Color.RED) == "Color.RED"
    assert program_cache.describe(np.dtype("float32")) == "dtype(float32)"
    assert program_cache.describe({"b": 1, "a": (2, None)}) == program_cache.describe(
        {"a": (2, None), "b": 1})
    scale = 2.0
    for unstable in (lambda x: x, lambda: scale, np.zeros(2), object(), Spec(np.float32(1)),
                     functools.partial(step, lambda: 0), jax.sharding.Mesh(
                         np.array(jax.devices()[:1]), ("x",))):
        assert program_cache.describe(unstable) is None, unstable


def test_key_changes_with_everything_the_trace_depends_on(monkeypatch):
    x, state = _args()
    base = program_cache.key(step, Spec(2.0), (x, state), (2,))
    assert base == program_cache.key(step, Spec(2.0), (x, state), (2,))
    variants = {
        "static": program_cache.key(step, Spec(3.0), (x, state), (2,)),
        "shape": program_cache.key(step, Spec(2.0), (x[:1], state), (2,)),
        "dtype": program_cache.key(step, Spec(2.0), (x.astype(jnp.bfloat16), state), (2,)),
        "weak type": program_cache.key(step, Spec(2.0), (x, (3, state[1])), (2,)),
        "tree": program_cache.key(step, Spec(2.0), (x, list(state)), (2,)),
        "donation": program_cache.key(step, Spec(2.0), (x, state), ()),
        "function": program_cache.key(functools.partial(step), Spec(2.0), (x, state), (2,)),
    }
    monkeypatch.setenv("JAXSPEC_LAYOUT", "cpu-xla")
    variants["environment"] = program_cache.key(step, Spec(2.0), (x, state), (2,))
    monkeypatch.delenv("JAXSPEC_LAYOUT")
    monkeypatch.setattr(program_cache, "_source_digest", lambda: "edited")
    variants["source"] = program_cache.key(step, Spec(2.0), (x, state), (2,))
    for what, variant in variants.items():
        assert variant is not None and variant != base, what
    assert len(set(variants.values())) == len(variants)
    assert program_cache.key(lambda s, x, st: x, Spec(2.0), (x, state)) is None


def test_a_saved_program_is_loaded_and_gives_the_same_results(cache_on):
    x, state = _args()
    reference = jax.jit(step, static_argnums=0)(Spec(2.0), x, state)
    first, how = program_cache.load_or_compile(step, Spec(2.0), x, state, donate=(2,))
    assert how == "saved" and len(os.listdir(cache_on)) == 1
    again, how = program_cache.load_or_compile(step, Spec(2.0), x, state, donate=(2,))
    assert how == "loaded" and program_cache.stats == {"loaded": 1, "saved": 1}
    assert jax.tree.structure(again.out_info) == jax.tree.structure(reference)
    for program in (first, again):
        donated = _args()[1]
        out = program(x, donated)
        assert donated[1].is_deleted()  # the state's buffers were donated
        assert jax.tree.structure(out) == jax.tree.structure(reference)
        for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(reference)):
            np.testing.assert_array_equal(got, want)
    _, how = program_cache.load_or_compile(step, Spec(5.0), x, state, donate=(2,))
    assert how == "saved" and len(os.listdir(cache_on)) == 2


def test_outputs_are_known_before_the_background_compile_ends(cache_on):
    x, state = _args()
    want = jax.jit(step, static_argnums=0).lower(Spec(2.0), x, state).compile().out_info
    for how in ("saved", "loaded"):
        pending = program_cache.start(step, Spec(2.0), x, state, donate=(2,))
        assert pending.how == how
        info = pending.out_info  # from the saved program, while it compiles
        assert jax.tree.structure(info) == jax.tree.structure(want)
        assert [(a.shape, a.dtype, a.weak_type) for a in jax.tree.leaves(info)] == [
            (a.shape, a.dtype, a.weak_type) for a in jax.tree.leaves(want)]
        out = pending.result()(x, _args()[1])
        np.testing.assert_array_equal(out["y"], x * 2.0)
        assert int(out["state"][0]) == 4


def test_the_folder_keeps_the_most_recently_used_programs(cache_on, monkeypatch):
    x, state = _args()
    for scale in (1.0, 2.0):
        program_cache.load_or_compile(step, Spec(scale), x, state)
    sizes = {path.name: path.stat().st_size for path in cache_on.iterdir()}
    monkeypatch.setattr(program_cache, "MAX_BYTES", sum(sizes.values()) + 100)
    assert program_cache.load_or_compile(step, Spec(1.0), x, state)[1] == "loaded"  # used now
    assert program_cache.load_or_compile(step, Spec(3.0), x, state)[1] == "saved"
    assert sum(p.stat().st_size for p in cache_on.iterdir()) <= program_cache.MAX_BYTES
    assert program_cache.load_or_compile(step, Spec(1.0), x, state)[1] == "loaded"
    assert program_cache.load_or_compile(step, Spec(3.0), x, state)[1] == "loaded"
    assert program_cache.load_or_compile(step, Spec(2.0), x, state)[1] == "saved"  # was pruned


def test_damaged_file_is_traced_again_and_replaced(cache_on):
    x, state = _args()
    program_cache.load_or_compile(step, Spec(2.0), x, state)
    (path,) = cache_on.iterdir()
    path.write_bytes(b"not a program")
    program, how = program_cache.load_or_compile(step, Spec(2.0), x, state)
    assert how == "saved" and path.stat().st_size > 100
    np.testing.assert_array_equal(program(x, state)["y"], x * 2.0)
    assert program_cache.load_or_compile(step, Spec(2.0), x, state)[1] == "loaded"


@pytest.mark.parametrize("setting", ["0", "xla"])
def test_off_compiles_as_before_and_writes_nothing(cache_on, monkeypatch, setting):
    monkeypatch.setenv(compile_cache.ENV, setting)
    x, state = _args()
    program, how = program_cache.load_or_compile(step, Spec(2.0), x, state)
    assert how == "compiled" and not cache_on.exists()
    np.testing.assert_array_equal(program(x, state)["y"], x * 2.0)


def test_uncacheable_static_compiles_as_before(cache_on):
    x, state = _args()
    _, how = program_cache.load_or_compile(lambda spec, x, state: x, Spec(2.0), x, state)
    assert how == "compiled" and not cache_on.exists()


def _decoder_args(kind: str):
    """(target, draft, draft_params) for one draft kind."""
    if kind == "head":  # the kind the CLI uses by default (with SmolLM2)
        target = successor_model(40)
        config, params, *_ = trained_head(target, draft_vocab=24, steps=2, rows=16)
        return target, HeadDraft(config, threshold=0.2), {"head": params,
                                                           "embed": target.params["embed"]}
    target = tiny_model(0)
    return target, tiny_model(1) if kind == "model" else "ngram:2", None


@pytest.mark.parametrize("kind, temperature", [("model", 0.0), ("model", 0.8), ("ngram", 0.8),
                                               ("head", 0.0), ("head", 0.8)])
def test_decoder_output_is_the_same_from_loaded_programs(cache_on, kind, temperature):
    target, draft, draft_params = _decoder_args(kind)
    prompts = [[3, 4, 5, 6, 3, 4], [7, 8]]

    def run(mode):
        decoder = SpeculativeDecoder(target, draft, num_speculative_tokens=3, mode=mode,
                                     draft_params=draft_params)
        return decoder.generate(prompts, max_new_tokens=10, temperature=temperature, seed=4)

    fresh = {mode: run(mode) for mode in ("dynamic", "static")}
    saved = dict(program_cache.stats)
    loaded = {mode: run(mode) for mode in ("dynamic", "static")}
    assert saved["saved"] == 3 and program_cache.stats["loaded"] == 3  # dynamic, init, chunk
    for mode in fresh:
        assert loaded[mode].tokens == fresh[mode].tokens
        assert loaded[mode].stats["accepted_per_position"] == fresh[
            mode].stats["accepted_per_position"]
    if temperature == 0:
        assert fresh["static"].tokens == greedy_reference(target, prompts, 10)


SCRIPT = r"""
import json, sys
import jaxspec
from jaxspec import program_cache
from jaxspec.models import decoder

traced = []  # the model's layers are run only while a program is traced
original = decoder.run_layers
decoder.run_layers = lambda *args, **kwargs: traced.append(1) or original(*args, **kwargs)
model = jaxspec.load_model(sys.argv[1])
decoder_ = jaxspec.SpeculativeDecoder(model, "ngram", num_speculative_tokens=2, mode="static")
out = decoder_.generate([[5, 6, 7, 5, 6]], max_new_tokens=8, temperature=0.7, seed=3)
print(json.dumps({"tokens": out.tokens, "stats": program_cache.stats, "traced": len(traced)}))
"""


def test_a_second_process_traces_nothing_of_the_loop(tmp_path):
    model_dir = tiny_hf_model("llama", tmp_path)
    cache = str(tmp_path / "cache")
    first, second = (script_json(SCRIPT, model_dir, cache=cache) for _ in range(2))
    plain = script_json(SCRIPT, model_dir, cache=str(tmp_path / "off"), compile_cache="0")
    assert first["stats"] == {"loaded": 0, "saved": 2}, first
    assert second["stats"] == {"loaded": 2, "saved": 0}, second
    assert first["traced"] > 0 and second["traced"] == 0
    assert first["tokens"] == second["tokens"] == plain["tokens"]


def test_a_file_that_reads_but_does_not_compile_is_replaced(cache_on, monkeypatch):
    x, state = _args()
    program_cache.load_or_compile(step, Spec(2.0), x, state)
    real = program_cache._compiled
    calls = []

    def failing_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("incompatible")
        return real(*args)

    monkeypatch.setattr(program_cache, "_compiled", failing_once)
    program, how = program_cache.load_or_compile(step, Spec(2.0), x, state)
    assert how == "saved" and len(calls) == 2
    np.testing.assert_array_equal(program(x, state)["y"], x * 2.0)
