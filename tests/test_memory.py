"""The memory planner (jaxspec.memory): its terms are the sizes of what the loop allocates, and
a run that does not fit is refused with one line before anything is compiled or allocated."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_model

import jaxspec
from jaxspec.kernels import cpu_matmul
from jaxspec import generate as cli
from jaxspec import memory
from jaxspec.decode import loop, sampling
from jaxspec.decode import sizing
from jaxspec.decode.sizing import loop_max_len
from jaxspec.decode.state import LoopSpec
from jaxspec.errors import UserError
from jaxspec.models import layout as layouts
from jaxspec.models.cache import init_cache

PROMPTS = [[1, 2, 3, 4, 5], [6, 7]]
MAX_NEW = 20
TINY = dict(vocab=48, hidden=32, layers=2)


def nbytes(tree) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def allocated_state(decoder, temperature: float):
    """The shapes of the DecodeState that generate would allocate (init_state, abstractly)."""
    sampler, values = sampling.make(temperature)
    spec = LoopSpec(target=decoder.target.config, draft=decoder.draft, gamma=decoder.gamma,
                    sampler=sampler, max_len=loop_max_len(5, MAX_NEW, decoder.gamma),
                    dtype=decoder.target.params["embed"].dtype, layout=decoder.layout,
                    rejection=decoder.rejection)
    prompt = np.zeros((len(PROMPTS), 16), np.int32)
    lengths = np.array([len(p) for p in PROMPTS], np.int32)
    init = functools.partial(loop.init_state, spec)
    return jax.eval_shape(init, decoder.target.params, decoder.draft_params, prompt, lengths,
                          jax.random.key(0), values, MAX_NEW)


@functools.cache
def model(**kwargs):
    """tiny_model, built once per configuration (its first build compiles the initialiser)."""
    return tiny_model(**{**TINY, **kwargs})


DRAFTS = {
    "plain": lambda: None,
    "ngram": lambda: "ngram",
    "model": lambda: model(seed=1, hidden=16, layers=1),
    "layerskip": lambda: "layerskip:1",
}


@pytest.mark.parametrize("layout", [layouts.CPU, layouts.ACCELERATOR], ids=lambda x: x.name)
@pytest.mark.parametrize("kind", DRAFTS)
def test_terms_are_the_allocated_sizes(kind, layout, monkeypatch):
    monkeypatch.setenv(layouts.ENV, layout.name)
    target = model(tied=True)  # tied: the CPU layout adds an lm_head copy
    decoder = jaxspec.SpeculativeDecoder(target, DRAFTS[kind](), num_speculative_tokens=3,
                                         device="cpu")
    assert decoder.layout == layout
    for temperature in (0.0, 0.7):
        plan = decoder.memory_plan(PROMPTS, MAX_NEW, temperature=temperature)
        state = allocated_state(decoder, temperature)
        assert plan.target_params == nbytes(decoder.target.params)
        assert plan.draft_params == (nbytes(decoder.draft_params) if kind == "model" else 0)
        assert plan.target_cache == nbytes(state.target_cache)
        assert plan.draft_state == nbytes(state.draft_state)
        assert (plan.draft_state > 0) == (kind in ("model", "layerskip"))
        assert plan.token_buffer == nbytes(state.tokens)
        B, V, g = len(PROMPTS), 48, decoder.gamma
        logits = B * (g + 1) * V * 4  # verify logits [B, γ+1, V] fp32
        extra = B * g * V * 4 + B * (g + 1) * V * 4 if temperature else 0  # q and p
        assert plan.activations == logits + extra
        held = sum(b for label, b in plan.terms() if "activations" not in label)
        assert plan.total == held + max(plan.activations, plan.prefill)


def test_plain_decoding_terms_match_real_arrays():
    target = model()
    decoder = jaxspec.SpeculativeDecoder(target)
    plan = decoder.memory_plan(PROMPTS, MAX_NEW)
    state = allocated_state(decoder, 0.0)
    real_cache = jax.jit(lambda: init_cache(target.config, len(PROMPTS), state.tokens.shape[1],
                                                 np.float32, decoder.layout))()
    assert plan.target_cache == real_cache.k.nbytes + real_cache.v.nbytes
    placed = decoder.target.params  # in the decoder's layout (CPU: panels, output copy)
    assert plan.target_params == sum(leaf.nbytes for leaf in jax.tree.leaves(placed))
    assert plan.activations == len(PROMPTS) * 1 * 48 * 4


def _small(device):
    return memory.Capacity(1000, "a test limit")


def test_refused_before_anything_is_compiled_or_allocated(monkeypatch):
    decoder = jaxspec.SpeculativeDecoder(model(), "ngram", num_speculative_tokens=2)
    monkeypatch.setattr(memory, "capacity", _small)
    monkeypatch.setattr(decoder, "_compile", lambda *a, **k: pytest.fail("compiled"))
    live = len(jax.live_arrays())
    with pytest.raises(UserError) as e:
        decoder.generate(PROMPTS, max_new_tokens=MAX_NEW, temperature=0.5)
    assert len(jax.live_arrays()) == live
    message = str(e.value)
    assert "\n" not in message
    for label, size in decoder.memory_plan(PROMPTS, MAX_NEW, temperature=0.5).terms():
        assert f"{label} {memory.human(size)}" in message, (label, message)
    assert "1000 B" in message and "a test limit" in message


def test_cli_refusal_is_one_line_and_verbose_prints_the_plan(monkeypatch, tmp_path, capsys):
    from jaxspec.checkpoint import load as load_module

    calls = []

    def fake_load(source, *, dtype, device, tp=1, tokenizer="transformers"):
        calls.append(device)
        loaded = dataclasses.replace(model(), tokenizer=_Tokenizer(), path=source)
        return load_module.place(loaded, layouts.for_platform(device.platform), device)

    monkeypatch.setattr(load_module, "load_model", fake_load)
    monkeypatch.setattr(memory, "capacity", _small)
    argv = ["hi there", "--model", str(tmp_path), "--max-new-tokens", "8", "--json"]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: not enough memory")
    assert calls and calls[-1].platform == "cpu"  # --device auto, resolved before loading

    assert cli.main(argv + ["--verbose"]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert lines[0].startswith("[jaxspec] device ") and "cpu" in lines[0]
    for label in memory.LABELS.values():
        assert any(line.startswith(f"[jaxspec]   {label} ") for line in lines), (label, err)
    assert any("1000 B (a test limit)" in line for line in lines), err
    assert lines[-1].startswith("error: not enough memory")


class _Tokenizer:
    """Byte ids below the tiny vocabulary; no chat template."""

    chat_template = None

    def encode(self, text):
        return [1 + b % 40 for b in text.encode()]

    def decode(self, ids, **kwargs):
        return " ".join(map(str, ids))


def test_capacity_sources(tmp_path):
    class Device:
        platform = "gpu"

        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            if isinstance(self.stats, Exception):
                raise self.stats
            return self.stats

        def __str__(self):
            return "fake:0"

    assert memory.capacity(Device({"bytes_limit": 123, "bytes_in_use": 7})) == memory.Capacity(
        123, "bytes_limit of fake:0")
    assert memory.capacity(Device(None)) is None
    neuron = Device(NotImplementedError())
    neuron.platform = "neuron"
    assert memory.capacity(neuron) is None
    cpu = memory.capacity(jax.devices("cpu")[0])
    assert cpu is not None and not cpu.counts_params and cpu.bytes > 0
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  1000 kB\nMemFree:  10 kB\nMemAvailable:  512 kB\n")
    assert memory.mem_available(str(meminfo)) == 512 * 1024
    assert memory.mem_available(str(tmp_path / "absent")) is None


def test_check_counts_params_only_against_a_whole_pool():
    plan = memory.Plan(target_params=600, draft_params=100, target_cache=200, draft_state=0,
                       token_buffer=50, activations=50, prefill=20)
    assert plan.total == 1000 and plan.params == 700
    memory.check(plan, memory.Capacity(1000, "pool"))
    memory.check(plan, memory.Capacity(300, "free", counts_params=False))
    memory.check(plan, None)  # unknown capacity: nothing to check
    with pytest.raises(UserError, match="needs 1000 B"):
        memory.check(plan, memory.Capacity(999, "pool"))
    with pytest.raises(UserError, match="needs 300 B"):
        memory.check(plan, memory.Capacity(299, "free", counts_params=False))


def test_human_units():
    assert [memory.human(n) for n in (0, 1023, 1024, 1536, 5 * 2**20, 3 * 2**30, 2**50)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 MiB", "3.0 GiB", "1024.0 TiB"]


def test_prefill_activations_match_what_xla_allocates():
    """A long prompt: the prefill's attention weights dominate. The planned term is within
    10% of the temporaries XLA allocates for the prefill program (its memory analysis), and
    it is what the plan's total counts; a capacity below it is refused before compiling."""
    target = model(max_positions=1024)
    decoder = jaxspec.SpeculativeDecoder(target, None, device="cpu")
    prompts = [[3] * 500, [4] * 300]
    plan = decoder.memory_plan(prompts, 8)
    assert plan.prefill > 10 * plan.activations
    assert plan.total == plan.params + plan.target_cache + plan.token_buffer + plan.prefill
    spec = decoder._loop_spec(prompts, 8, sampling.Sampler(greedy=True))
    _, values = sampling.make(0.0)
    width = sizing.prompt_width(500)
    args = (decoder.target.params, None, jnp.zeros((2, width), jnp.int32),
            jnp.asarray([500, 300]), jax.random.key(0), values, 8)
    compiled = jax.jit(loop.init_state, static_argnums=0).lower(spec, *args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert 0.9 * plan.prefill <= temp <= 1.1 * plan.prefill, (temp, plan.prefill)
    with pytest.raises(UserError, match="prefill activations"):
        memory.check(plan, memory.Capacity(plan.total - 1, "a test limit"))


@pytest.mark.skipif(not cpu_matmul.available(), reason="kernel unavailable here")
def test_the_cpu_prefill_kernel_keeps_no_attention_weights():
    """Where the CPU prefill-attention kernel runs (head size 16), the prefill term is the
    MLP's: XLA's temporaries for the prefill are a fraction of the attention weights that the
    blocked XLA attention would hold."""
    target = model(hidden=64, max_positions=1024)
    decoder = jaxspec.SpeculativeDecoder(target, None, device="cpu")
    prompts = [[3] * 500, [4] * 300]
    plan = decoder.memory_plan(prompts, 8)
    width = sizing.prompt_width(500)
    assert plan.prefill == 2 * width * 2 * target.config.intermediate_size * 4
    spec = decoder._loop_spec(prompts, 8, sampling.Sampler(greedy=True))
    _, values = sampling.make(0.0)
    args = (decoder.target.params, None, jnp.zeros((2, width), jnp.int32),
            jnp.asarray([500, 300]), jax.random.key(0), values, 8)
    compiled = jax.jit(loop.init_state, static_argnums=0).lower(spec, *args).compile()
    weights = memory.prefill_bytes(target.config, 2, width, 4) - plan.prefill
    assert weights > 0 and compiled.memory_analysis().temp_size_in_bytes < weights / 4
