"""The validation layer (jaxspec.validation) over the whole public surface: every argument of
SpeculativeDecoder(...), .generate(...), .memory_plan(...) and load_model(...), several bad
values each, raises UserError with one line naming the argument; good values of every accepted
type work; the CLI and the API accept the same values; loops cannot hang."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import greedy_reference, tiny_model

import jaxspec
from jaxspec import UserError, generate as cli, validation
from jaxspec.decode import loop

VOCAB = 48
PROMPT = [5, 17, 3, 9]


@pytest.fixture(scope="module")
def target():
    return tiny_model(0, std=0.5, vocab=VOCAB)


@pytest.fixture(scope="module")
def decoder(target):
    return jaxspec.SpeculativeDecoder(target, "ngram", num_speculative_tokens=2)


def assert_names(error: pytest.ExceptionInfo, arg: str) -> None:
    message = str(error.value)
    assert arg in message and "\n" not in message, message


class Opaque:
    """An object of a type jaxspec knows nothing about; its repr (the test id) names no
    address, so every pytest-xdist worker collects the same tests."""

    def __repr__(self) -> str:
        return "Opaque()"


BAD_DECODER = {  # argument -> bad values (the target is valid unless the argument is "target")
    "target": ["/some/path", None, 3],
    "draft": [3, 1.5, Opaque(), "ngram:x", "ngram:0", "ngram:10000000000", "layerskip:abc",
              "layerskip:2"],
    "num_speculative_tokens": [0, 33, -1, 2.0, True, "4", "many"],
    "mode": ["fast", 1, ""],
    "static_iterations": [0, -3, 1.5, None, True, 2**31],
    "prng_impl": ["threefry", 3],
    "device": ["tpu", "cuda", 3],
    "tp": [0, 1.5, "2", None],
    "dp": [0, -1, None],
    "draft_params": [{"w": np.zeros(3)}],  # only for a Draft object, not "ngram"
}
DECODER_CASES = [(arg, value) for arg, values in BAD_DECODER.items() for value in values]


@pytest.mark.parametrize("arg,value", DECODER_CASES,
                         ids=[f"{a}={v!r}"[:40] for a, v in DECODER_CASES])
def test_decoder_arguments(target, arg, value):
    kwargs = {"draft": "ngram", arg: value}
    model = kwargs.pop("target", target)
    with pytest.raises(UserError) as error:
        jaxspec.SpeculativeDecoder(model, **kwargs)
    name = {"draft_params": "draft_params", "device": "device"}.get(arg, arg)
    assert_names(error, "draft" if arg == "draft" and isinstance(value, str) else name)


BAD_GENERATE = {
    "prompts": ["hello", b"hi", [], [[]], [[1.5]], [["a"]], [[-1]], [[VOCAB]], [[True]], 5, [5],
                ["hello"], np.zeros((1, 2, 2), np.int32), np.zeros((1, 3), np.float32),
                [np.ones((2, 2), np.int32)]],
    "max_new_tokens": [0, -1, None, 1.5, 4.0, True, "8", 2**31],
    "temperature": [-1, math.inf, -math.inf, math.nan, None, "0.5", True],
    "top_k": [-1, 2**31, 1.5, None, True],
    "top_p": [0, 1.5, math.nan, math.inf, None, "0.9"],
    "seed": [-1, 2**32, 1.5, "1", None, [1, 2], [-1], [2**32], [1.0]],
    "on_update": [3, "print"],
}
GENERATE_CASES = [(arg, value) for arg, values in BAD_GENERATE.items() for value in values]


@pytest.mark.parametrize("arg,value", GENERATE_CASES,
                         ids=[f"{a}={v!r}"[:40] for a, v in GENERATE_CASES])
def test_generate_arguments(decoder, arg, value):
    kwargs = {"prompts": [PROMPT], "max_new_tokens": 4, arg: value}
    with pytest.raises(UserError) as error:
        decoder.generate(kwargs.pop("prompts"), **kwargs)
    assert_names(error, arg)
    if arg in ("prompts", "max_new_tokens", "temperature"):  # memory_plan takes these too
        with pytest.raises(UserError) as error:
            decoder.memory_plan(kwargs.get("prompts", [PROMPT]) if arg != "prompts" else value,
                                **{k: v for k, v in kwargs.items()
                                   if k in ("max_new_tokens", "temperature")})
        assert_names(error, arg)


BAD_LOAD = {
    "source": [3, None, ["a"]],
    "dtype": ["float16", None, 3, ["float32"]],
    "device": ["tpu", 3],
    "tp": [0, 1.5],
    "dp": [0, "1"],
}
LOAD_CASES = [(arg, value) for arg, values in BAD_LOAD.items() for value in values]


@pytest.mark.parametrize("arg,value", LOAD_CASES, ids=[f"{a}={v!r}"[:40] for a, v in LOAD_CASES])
def test_load_model_arguments(tmp_path, arg, value):
    kwargs = {"source": str(tmp_path), arg: value}
    with pytest.raises(UserError) as error:
        jaxspec.load_model(kwargs.pop("source"), **kwargs)
    assert_names(error, arg)


def test_every_accepted_form_of_prompts_and_integers(target, decoder):
    """Lists, tuples, NumPy and JAX arrays, NumPy integer ids and arguments: one result."""
    want = decoder.generate([PROMPT], max_new_tokens=5).tokens
    assert want == greedy_reference(target, [PROMPT], 5)
    forms = [[tuple(PROMPT)], np.asarray([PROMPT], np.int64), jnp.asarray([PROMPT]),
             [np.asarray(PROMPT, np.int32)], [[np.int16(t) for t in PROMPT]]]
    for prompts in forms:
        out = decoder.generate(prompts, max_new_tokens=np.int64(5), top_k=np.int32(0),
                               seed=np.uint32(7), temperature=np.float32(0.0))
        assert out.tokens == want, type(prompts)


def test_largest_values_run(decoder):
    """The top of each integer range compiles and runs (int32 / uint32 scalars in the loop)."""
    out = decoder.generate([PROMPT, PROMPT], max_new_tokens=3, temperature=1.0,
                           top_k=validation.INT32_MAX, seed=validation.SEED_MAX)
    assert all(len(t) == 3 for t in out.tokens)
    out = decoder.generate([PROMPT, PROMPT], max_new_tokens=3, temperature=1.0,
                           seed=[validation.SEED_MAX, 0])
    assert all(len(t) == 3 for t in out.tokens)


CLI_VALUES = {  # flag -> (values the API accepts, values it refuses), as the CLI types them
    "--seed": (["0", str(validation.SEED_MAX)], ["-1", str(2**32)]),
    "--top-k": (["0", str(validation.INT32_MAX)], ["-1", str(2**31)]),
    "--temperature": (["0", "1e30"], ["-1", "inf", "nan"]),
    "--top-p": (["1", "0.01"], ["0", "1.5", "inf"]),
    "--max-new-tokens": (["1", str(validation.INT32_MAX)], ["0", str(2**31)]),
    "--num-speculative-tokens": (["1", "32", "auto"], ["0", "33"]),
    "--tp": (["1"], ["0", "-2"]),
}


@pytest.mark.parametrize("flag", CLI_VALUES)
def test_cli_and_api_accept_the_same_values(flag):
    """CLI flags go through the same checks as the API's keyword arguments."""
    accepted, refused = CLI_VALUES[flag]
    for text in accepted + refused:
        args = cli.build_parser().parse_args(["hi", flag, text])
        value = getattr(args, flag[2:].replace("-", "_"))
        try:
            cli.validate(args)
            cli_ok = True
        except UserError as e:
            cli_ok = False
            assert flag in str(e)
        assert cli_ok == (text in accepted), (flag, text)
        api_ok = _api_accepts(flag[2:].replace("-", "_"), value)
        assert api_ok == cli_ok, (flag, text)


def _api_accepts(arg: str, value) -> bool:
    checks = {
        "seed": lambda: validation.check_seed(value, 1),
        "top_k": lambda: validation.check_sampling(1.0, value, 1.0),
        "temperature": lambda: validation.check_sampling(value, 0, 1.0),
        "top_p": lambda: validation.check_sampling(1.0, 0, value),
        "max_new_tokens": lambda: validation.check_max_new_tokens(value),
        "num_speculative_tokens": lambda: validation.check_decoder(value, None, 8, None, 1, 1),
        "tp": lambda: validation.check_decoder(None, None, 8, None, value, 1),
    }
    try:
        checks[arg]()
        return True
    except UserError:
        return False


def test_static_iterations_below_one_is_refused_not_a_hang(target):
    for value in (0, -1):
        with pytest.raises(UserError, match="static_iterations"):
            jaxspec.SpeculativeDecoder(target, None, mode="static", static_iterations=value)


def test_static_loop_stops_when_a_chunk_makes_no_progress(target, monkeypatch):
    """A chunk that adds no token to any unfinished row raises instead of repeating forever."""
    def stuck(spec, target_params, draft_params, values, state, *, iterations):
        return state

    monkeypatch.setattr(loop, "run_static", stuck)
    decoder = jaxspec.SpeculativeDecoder(target, None, mode="static", static_iterations=2)
    with pytest.raises(RuntimeError, match="no token"):
        decoder.generate([PROMPT], max_new_tokens=8)
