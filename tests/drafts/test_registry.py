"""Draft names: `registry.parse`'s grammar, `registry.build`, and the CLI's validation of --draft."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import jax.numpy as jnp
import pytest
from helpers import REPO, tiny_model

from jaxspec.drafts import registry
from jaxspec.drafts.base import Draft
from jaxspec.drafts.ngram import NgramDraft
from jaxspec.errors import UserError
from jaxspec.generate import build_parser, validate


@pytest.mark.parametrize("spec,expected", [
    (None, registry.DraftName(registry.NONE)),
    ("none", registry.DraftName(registry.NONE)),
    ("ngram", registry.DraftName(registry.NGRAM, number=3)),
    ("ngram:5", registry.DraftName(registry.NGRAM, number=5)),
    ("ngram:32", registry.DraftName(registry.NGRAM, number=32)),
    ("layerskip:8", registry.DraftName(registry.LAYERSKIP, number=8)),
    ("./some/path", registry.DraftName(registry.MODEL, source="./some/path")),
    ("smollm2-135m-instruct", registry.DraftName(registry.MODEL, source="smollm2-135m-instruct")),
    ("default+ngram", registry.DraftName(registry.DEFAULT, lookup=3)),
    ("./head+ngram:2", registry.DraftName(registry.MODEL, source="./head", lookup=2)),
    ("layerskip:4+ngram:5", registry.DraftName(registry.LAYERSKIP, number=4, lookup=5)),
    ("./a+b", registry.DraftName(registry.MODEL, source="./a+b")),  # a path with a plus
    ("./a+ngram/x", registry.DraftName(registry.MODEL, source="./a+ngram/x")),
])
def test_parse(spec, expected):
    """Each kind of draft name parses to its kind, number and source."""
    assert registry.parse(spec) == expected


@pytest.mark.parametrize("spec", ["ngram:two", "ngram:²", "layerskip", "layerskip:x", "ngram:0",
                                  "ngram:33", "ngram:99999999999"])
def test_parse_rejects_bad_numbers(spec):
    """A missing or non-numeric number after ngram:/layerskip: is a UserError naming the draft."""
    with pytest.raises(UserError, match=spec):
        registry.parse(spec)


@pytest.mark.parametrize("spec,message", [
    ("ngram+ngram", "follows a model draft"), ("none+ngram", "follows a model draft"),
    ("default+ngram:0", "must be in 1..32"), ("default+ngram:x", "expected a number"),
    ("layerskip+ngram", "expected a number")])
def test_parse_rejects_bad_lookups(spec, message):
    """'+ngram' needs a draft to fall back on and a valid n-gram length: a UserError."""
    with pytest.raises(UserError, match=message):
        registry.parse(spec)


def test_registry_imports_no_jax():
    """Importing the registry (what the CLI validates with) does not import JAX."""
    code = "import sys, jaxspec.drafts.registry; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("draft", ["smollm2-135m-instruct", "ngram:2"])
def test_cli_validate_accepts(draft):
    """The CLI accepts a model name as --draft (like a path) and a named draft."""
    validate(build_parser().parse_args(["hello", "--draft", draft]))


def test_cli_validate_rejects_a_missing_draft_path():
    """A --draft that is neither a name nor an existing path is a one-line UserError."""
    with pytest.raises(UserError) as error:
        validate(build_parser().parse_args(["hello", "--draft", "/no/such/dir"]))
    assert str(error.value).startswith("--draft: no such file or directory"), str(error.value)


@dataclasses.dataclass(frozen=True)
class RepeatLast(Draft):
    """A trivial draft: proposes the last token γ times."""

    def propose(self, params, state, tokens, lengths, *, gamma, sampler, values, uniforms):
        last = jnp.take_along_axis(tokens, lengths[:, None] - 1, axis=1)
        return jnp.repeat(last, gamma, axis=1), None, state


@pytest.fixture(scope="module")
def target():
    return tiny_model(layers=2)


def test_build_uses_a_draft_object_as_is(target):
    """An object implementing the Draft protocol is the loop's draft, with no draft model."""
    draft = RepeatLast()
    built, model = registry.build(draft, target)
    assert built is draft and model is None


def test_build_named_drafts(target):
    """ngram:2 builds an NgramDraft of max_ngram 2 with no draft model; none builds nothing."""
    built, model = registry.build("ngram:2", target)
    assert isinstance(built, NgramDraft) and model is None
    assert built.max_ngram == 2 and built.target_vocab == target.config.vocab_size
    assert registry.build("none", target) == (None, None)
