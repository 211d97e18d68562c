"""Neuron compatibility of the static-mode program, read from its lowered StableHLO text.

neuronx-cc (Trainium) rejects conditionals, data-dependent loop exits, host callbacks,
dynamic shapes, float64/complex, integer dots, variadic reduces (e.g. `argmax`) and sorts at
vocabulary size, and does not fully support the threefry PRNG (DESIGN.md, reference/neuron.md). No Neuron device is needed: the program that
the API compiles in static mode (`loop.init_state` once, then `loop.run_static` per chunk) is
lowered on CPU with an "rbg" PRNG key and its text is checked. The checker is itself tested on
small programs that contain each forbidden construct, and on the dynamic mode, whose
data-dependent `while` it must flag.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import pytest
from helpers import perturbed, tiny_model

from jaxspec.decode import loop, sampling
from jaxspec.drafts.model_draft import ModelDraft
from jaxspec.models import layout

ALLOWED_CUSTOM_CALLS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}
FORBIDDEN_OPS = {
    "stablehlo.case": "conditional (lax.cond / switch)",
    "stablehlo.if": "conditional",
    "stablehlo.sort": "sort",
    "chlo.top_k": "top_k",
    "stablehlo.send": "host transfer",
    "stablehlo.recv": "host transfer",
    "stablehlo.infeed": "host transfer",
    "stablehlo.outfeed": "host transfer",
}


@dataclasses.dataclass
class WhileLoop:
    line: int
    counted: bool  # counter from a constant, compared to a constant, stepped by a constant
    trip_count: int | None
    cond: list[str]


def _function_start(lines: list[str], index: int) -> int:
    while index > 0 and "func.func" not in lines[index]:
        index -= 1
    return index


def _constant_value(lines: list[str], start: int, end: int, name: str) -> int | None:
    """Integer value of `name = stablehlo.constant dense<N>` defined in lines[start:end]."""
    pattern = re.compile(rf"^\s*{re.escape(name)} = stablehlo\.constant dense<(-?\d+)> : "
                         r"tensor<i(?:32|64)>")
    for line in reversed(lines[start:end]):
        match = pattern.match(line)
        if match:
            return int(match.group(1))
    return None


def _block(lines: list[str], start: int, closing: str) -> tuple[list[str], int]:
    """Lines from start up to (not including) the line equal to `closing`; and its index."""
    end = start
    while lines[end] != closing:
        end += 1
    return lines[start:end], end


def while_loops(text: str) -> list[WhileLoop]:
    """Every `stablehlo.while` in the text, classified as counted (fixed trip count) or not."""
    lines = text.splitlines()
    loops = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)(%\S+) = stablehlo\.while\((.*?)\) :", line)
        if not match:
            if "stablehlo.while" in line:
                loops.append(WhileLoop(i, False, None, ["<unparsed>"]))
            continue
        indent = match.group(1)
        carried = re.findall(r"(%iterArg\w*) = (%[\w#]+)", match.group(3))
        assert lines[i + 1] == indent + "cond {", lines[i + 1]
        cond, end = _block(lines, i + 2, indent + "} do {")
        body, _ = _block(lines, end + 1, indent + "}")
        loops.append(_classify(lines, i, carried, cond, body, indent))
    return loops


def _classify(lines, i, carried, cond, body, indent) -> WhileLoop:
    uncounted = WhileLoop(i, False, None, cond)
    ops = [c.strip() for c in cond]
    compares = [c for c in ops if "stablehlo.compare" in c]
    others = [c for c in ops if "stablehlo.compare" not in c and "stablehlo.constant" not in c
              and not c.startswith("stablehlo.return")]
    if len(compares) != 1 or others:
        return uncounted
    match = re.match(r"(%\S+) = stablehlo\.compare\s+LT, (%iterArg\w*), (%\S+), SIGNED",
                     compares[0])
    if not match or ops[-1] != f"stablehlo.return {match.group(1)} : tensor<i1>":
        return uncounted
    counter, bound_name = match.group(2), match.group(3).rstrip(",")
    bound = _constant_value(cond, 0, len(cond), bound_name)
    names = [name for name, _ in carried]
    if bound is None or counter not in names:
        return uncounted
    start = _constant_value(lines, _function_start(lines, i), i, dict(carried)[counter])
    # the body's own `stablehlo.return` (one level in) hands back counter + constant step
    returns = [b for b in body if b.startswith(indent + "  stablehlo.return ")]
    if start is None or len(returns) != 1:
        return uncounted
    returned = re.findall(r"%[\w#]+", returns[0].split(":")[0])[names.index(counter)]
    step_match = [re.match(rf"^\s*{re.escape(returned)} = stablehlo\.add "
                           rf"{re.escape(counter)}, (%\S+) :", b) for b in body]
    step_match = [m for m in step_match if m]
    if len(step_match) != 1:
        return uncounted
    step = _constant_value(body, 0, len(body), step_match[0].group(1))
    if step != 1:
        return uncounted
    return WhileLoop(i, True, max(bound - start, 0), cond)


def _reduce_inputs(line: str) -> int:
    """Number of reduced inputs of a stablehlo.reduce / reduce_window line."""
    if re.search(r"stablehlo\.reduce(_window)?\(%", line):  # pretty form: one `init:` each
        return line.count(" init: ")
    operands = re.search(r'"stablehlo\.reduce(?:_window)?"\(([^)]*)\)', line)
    return len(operands.group(1).split(",")) // 2  # generic form: inputs then inits


def violations(text: str) -> list[str]:
    """Everything in a StableHLO module that neuronx-cc would reject (see the module doc)."""
    found = []
    for op, why in FORBIDDEN_OPS.items():
        if re.search(rf"{re.escape(op)}\b", text):
            found.append(f"{why}: {op}")
    for target in re.findall(r'custom_call\s*@([\w.]+)|call_target_name\s*=\s*"([^"]+)"', text):
        name = target[0] or target[1]
        if name not in ALLOWED_CUSTOM_CALLS:
            kind = "host callback" if "callback" in name else "custom call"
            found.append(f"{kind}: {name}")
    if "threefry" in text:  # jax.random.split / fold_in / draws from a threefry key
        found.append("threefry PRNG (not completely supported: use rbg keys)")
    if re.search(r"\bf64\b|xf64>|complex<", text):
        found.append("float64 or complex type")
    if re.search(r"tensor<[^>]*\?", text):
        found.append("dynamic shape")
    for line in text.splitlines():
        if re.search(r'stablehlo\.reduce(_window)?[("]', line) and _reduce_inputs(line) > 1:
            found.append(f"variadic reduce: {line.strip()[:100]}")
        if "stablehlo.dot_general" in line:
            operand_types = re.search(r":\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)", line)
            if not operand_types or any(re.search(r"x?[iu]\d+>$", t) or t.endswith("i1>")
                                        for t in operand_types.groups()):
                found.append(f"integer (or unparsed) dot_general: {line.strip()[:100]}")
    for w in while_loops(text):
        if not w.counted:
            found.append(f"data-dependent while at line {w.line}: {' | '.join(w.cond)[:200]}")
    return found


# --- the checker finds each forbidden construct ------------------------------------------------

def _text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


X = jnp.ones((4, 8), jnp.float32)


@pytest.mark.parametrize(
    "fn, expected",
    [
        (lambda x: jax.lax.cond(x[0, 0] > 0, lambda: x, lambda: -x), "conditional"),
        (lambda x: jnp.sort(x, axis=-1), "sort"),
        (lambda x: jax.lax.top_k(x, 2)[0], "top_k"),
        (lambda x: jnp.argmax(x, axis=-1), "variadic reduce"),
        (lambda x: x + jax.random.uniform(jax.random.fold_in(jax.random.key(0, impl="rbg"), 1),
                                          x.shape), "threefry"),
        (lambda x: jax.pure_callback(lambda a: a, jax.ShapeDtypeStruct(x.shape, x.dtype), x),
         "host callback"),
        (lambda x: jnp.arange(8) @ jnp.arange(8) + x, "integer"),
        (lambda x: jax.lax.while_loop(lambda c: jnp.sum(c) < 100.0, lambda c: c * 2.0, x),
         "data-dependent while"),
        (lambda x: jax.lax.fori_loop(0, jnp.int32(x[0, 0]), lambda i, c: c + 1.0, x),
         "data-dependent while"),
    ],
    ids=["cond", "sort", "top_k", "argmax", "threefry", "callback", "int_dot", "while", "fori_traced_bound"],
)
def test_checker_flags_forbidden_constructs(fn, expected):
    found = violations(_text(fn, X))
    assert any(expected in v for v in found), found


def test_checker_flags_float64_and_accepts_counted_loops():
    assert violations("%0 = stablehlo.add %a, %b : tensor<2xf64>")
    assert violations("%0 = stablehlo.add %a, %b : tensor<complex<f32>>")
    text = _text(lambda x: jax.lax.fori_loop(0, 32, lambda i, c: c * 2.0, x), X)
    assert violations(text) == []
    assert [w.trip_count for w in while_loops(text)] == [32]
    text = _text(lambda x: jax.lax.fori_loop(3, 10, lambda i, c: c + i, x), X)
    assert [w.trip_count for w in while_loops(text)] == [7]


# --- the static-mode program -------------------------------------------------------------------

ITERATIONS = 4


@pytest.fixture(scope="module")
def models():
    target = tiny_model(0, std=0.5)
    return target, perturbed(target, noise=0.02)


def _lowered(models, sampler_kwargs, *, draft=True, gamma=3):
    """StableHLO text of (init_state, run_static, run_dynamic) for one spec, rbg PRNG key, in
    the layouts the layout policy picks for Neuron."""
    target, draft_model = models
    sampler, values = sampling.make(**sampler_kwargs)
    spec = loop.LoopSpec(target=target.config,
                         draft=ModelDraft(draft_model.config, target.config.vocab_size)
                         if draft else None, gamma=gamma if draft else 0, sampler=sampler,
                         max_len=128, layout=layout.for_platform("neuron"))
    draft_params = draft_model.params if draft else None
    args = (target.params, draft_params, jnp.zeros((2, 16), jnp.int32),
            jnp.asarray([3, 5], jnp.int32), jax.random.key(0, impl="rbg"), values,
            jnp.int32(20))
    init = jax.jit(loop.init_state, static_argnums=0).lower(spec, *args)
    state = jax.eval_shape(functools.partial(loop.init_state, spec), *args)
    assert state.rng.shape == (4,) and state.rng.dtype == jnp.uint32  # rng_bit_generator state
    static = jax.jit(loop.run_static, static_argnums=0, static_argnames="iterations").lower(
        spec, target.params, draft_params, values, state, iterations=ITERATIONS)
    dynamic = jax.jit(loop.run_dynamic, static_argnums=0).lower(
        spec, target.params, draft_params, values, state)
    return init.as_text(), static.as_text(), dynamic.as_text()


CASES = {
    "sampled_top_k_top_p": (dict(temperature=0.8, top_k=5, top_p=0.9), True),
    "greedy": (dict(temperature=0.0), True),
    "sampled_no_draft": (dict(temperature=1.0, top_k=5, top_p=0.9), False),
}


@pytest.fixture(scope="module", params=list(CASES))
def programs(request, models):
    sampler_kwargs, draft = CASES[request.param]
    return request.param, _lowered(models, sampler_kwargs, draft=draft)


def test_static_program_is_neuron_compatible(programs):
    name, (init_text, static_text, _) = programs
    assert violations(static_text) == [], name
    assert violations(init_text) == [], name


def test_static_program_loops_have_fixed_trip_counts(programs):
    name, (init_text, static_text, _) = programs
    loops = while_loops(static_text)
    assert loops and all(w.counted for w in loops)
    trips = [w.trip_count for w in loops]
    assert ITERATIONS in trips  # the chunk loop itself
    if name.startswith("sampled"):
        assert 32 in trips  # bisection for the top-k / top-p thresholds
        assert "stablehlo.rng_bit_generator" in static_text  # rbg, not threefry, for bits
    assert all(w.counted for w in while_loops(init_text))


def test_dynamic_mode_is_flagged_by_the_same_check(programs):
    """Sanity check of the checker: dynamic mode loops until all rows are done."""
    name, (_, _, dynamic_text) = programs
    uncounted = [w for w in while_loops(dynamic_text) if not w.counted]
    assert len(uncounted) == 1, name
    assert any("data-dependent while" in v for v in violations(dynamic_text))
