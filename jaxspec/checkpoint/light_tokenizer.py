"""A tokenizer without transformers, for a quick start: the CLI spent ~0.6 s importing
`transformers` only to chat-template and encode one prompt.

`LightTokenizer` wraps the `tokenizers` library's Tokenizer (tokenizer.json) and reads
tokenizer_config.json, chat_template.jinja, additional_chat_templates/*.jinja and the legacy
special_tokens_map.json and added_tokens.json as transformers 5.24's
`PreTrainedTokenizerFast.from_pretrained` does, and adds the same special and added tokens to
the backend. So `encode`, `decode`, `len`, the BOS/EOS ids, the chat template and its rendering
(the same jinja2 sandbox, extensions, filters, globals and variables) are transformers'.
tests/checkpoint/test_light_tokenizer.py checks each against transformers on the tiny test
tokenizer, one rebuilt from GGUF metadata, a WordPiece one with the legacy files, config and
template variants, and the default model's where it is cached.

Like that tokenizer, it ignores chat_template.json (a processor's file). Not reproduced:
transformers' Mistral regex fix (applied only on request), tools, documents,
`continue_final_message`, assistant masks, and turning rich objects in messages (dataclasses,
arrays) into plain data: messages are dicts of plain values here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from tokenizers import AddedToken, Tokenizer

from jaxspec.checkpoint.source import one_line
from jaxspec.errors import UserError

# Files read from a tokenizer directory (and keys of `from_files`), and the templates' folder.
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "added_tokens.json", "chat_template.jinja")
TEMPLATE_DIR = "additional_chat_templates"
# The named special tokens, in transformers' order; other "*_token" config keys come after.
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                "mask_token")
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class LightTokenizer:
    """A tokenizer.json tokenizer with its config: encode, decode, apply_chat_template."""

    def __init__(self, backend: Tokenizer, special_tokens: dict[str, str],
                 chat_template: str | None, *, clean_up_spaces: bool = False,
                 clean_up_allowed: bool = True, template_names: tuple[str, ...] = ()):
        self.backend = backend
        self.special_tokens = special_tokens  # {"bos_token": "<s>", ...}: the template sees them
        self.chat_template = chat_template
        self.clean_up_spaces = clean_up_spaces  # decode's default
        self.clean_up_allowed = clean_up_allowed  # False: decode never cleans up (BPE)
        self._template_names = template_names  # named templates when none is "default"

    @classmethod
    def from_dir(cls, directory: str) -> LightTokenizer | None:
        """The tokenizer in directory, or None without a tokenizer.json."""
        if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
            return None
        return cls.from_files(read_files(directory))

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> LightTokenizer | None:
        """The tokenizer in {file name: contents} (names as in a directory), or None without a
        tokenizer.json."""
        if "tokenizer.json" not in files:
            return None
        try:
            backend = Tokenizer.from_buffer(files["tokenizer.json"])
        except Exception as e:  # the Rust library's error type
            raise UserError(f"cannot read tokenizer.json: {one_line(e)[:300]}") from None
        config = _json(files, "tokenizer_config.json")
        template, names = chat_template(config, files)
        special = _add_special_tokens(backend, config, files)
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        backend.no_truncation()  # encode() without truncation or padding, as transformers
        backend.no_padding()
        return cls(backend, special, template, template_names=names,
                   clean_up_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
                   clean_up_allowed=_clean_up_allowed(config, backend))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int] | int, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """The text of ids; clean_up_tokenization_spaces None: the config's setting (False
        unless set; ignored for BPE models unless the config forces it, as transformers)."""
        ids = [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = (self.clean_up_spaces if clean_up_tokenization_spaces is None
                 else clean_up_tokenization_spaces)
        return clean_up_tokenization(text) if clean and self.clean_up_allowed else text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False) -> str | list[int]:
        """The chat template's rendering of messages, its token ids with tokenize (the
        template writes the special tokens); UserError when it fails."""
        if tokenize:
            return self.encode(self.apply_chat_template(messages, add_generation_prompt),
                               add_special_tokens=False)
        if self.chat_template is None:
            named = f" (named ones: {', '.join(self._template_names)}; none is 'default')"
            raise UserError("the tokenizer has no chat template"
                            + (named if self._template_names else ""))
        if not messages:
            raise UserError("cannot apply the chat template to no messages")
        chat = [_message(m) for m in messages]
        try:
            return compile_template(self.chat_template).render(
                messages=chat, tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except Exception as e:  # the template is the model's code: any error is the input's
            raise UserError(f"the chat template failed: {type(e).__name__}: "
                            f"{one_line(e)[:300]}") from None

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id("eos_token")

    def get_vocab(self) -> dict[str, int]:
        """{token: id}, added tokens included."""
        return self.backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        """Vocabulary size with the added tokens."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _token_id(self, name: str) -> int | None:
        """The id of a named special token (the unknown token's id where it has none)."""
        token = self.special_tokens.get(name)
        if token is None:
            return None
        index = self.backend.token_to_id(token)
        return index if index is not None or name == "unk_token" else self._token_id("unk_token")


def read_files(directory: str) -> dict[str, bytes]:
    """{name: contents} of the tokenizer files in directory, templates folder included."""
    names = list(FILES)
    folder = os.path.join(directory, TEMPLATE_DIR)
    if os.path.isdir(folder):
        names += [f"{TEMPLATE_DIR}/{n}" for n in sorted(os.listdir(folder)) if n.endswith(".jinja")]
    return read_present(directory, names)


def read_present(directory: str, names: Sequence[str]) -> dict[str, bytes]:
    """{name: contents} of those of the files `names` that are present in directory."""
    out = {}
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = f.read()
    return out


def _json(files: Mapping[str, bytes], name: str) -> Any:
    if name not in files:
        return {}
    try:
        value = json.loads(files[name].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {name}: {one_line(e)[:300]}") from None
    if not isinstance(value, dict):
        raise UserError(f"cannot read {name}: not a JSON object")
    return value


def _text(data: bytes) -> str:
    """A text file's contents as Python's text mode reads them (universal newlines)."""
    return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def chat_template(config: dict, files: Mapping[str, bytes]) -> tuple[str | None, tuple[str, ...]]:
    """(the template, ()) or, where there are only named templates and none is "default",
    (None, their names). Template files win over the config's entry; a list of
    {"name", "template"} is a set of named templates."""
    templates = {}
    if "chat_template.jinja" in files:
        templates["default"] = _text(files["chat_template.jinja"])
    for name in files:
        if name.startswith(f"{TEMPLATE_DIR}/") and name.endswith(".jinja"):
            templates[name[len(TEMPLATE_DIR) + 1:-len(".jinja")]] = _text(files[name])
    if not templates:
        templates = config.get("chat_template")
        if isinstance(templates, (list, tuple)):
            templates = {t["name"]: t["template"] for t in templates}
    if not isinstance(templates, dict):
        return templates, ()
    if "default" in templates:
        return templates["default"], ()
    return None, tuple(sorted(templates))


def _added_token(value: Any) -> Any:
    """A token value with serialized AddedTokens ({"__type": "AddedToken", ...}) rebuilt."""
    if isinstance(value, dict) and value.get("__type") == "AddedToken":
        return AddedToken(**{k: v for k, v in value.items() if k != "__type"})
    if isinstance(value, list):
        return [_added_token(v) for v in value]
    if isinstance(value, dict):
        return {k: _added_token(v) for k, v in value.items()}
    return value


def _is_token(value: Any) -> bool:
    return isinstance(value, (str, AddedToken))


def _rename_additional(config: dict, *, when_falsy: bool) -> None:
    """additional_special_tokens (transformers 4) is extra_special_tokens (5)."""
    has_extra = bool(config.get("extra_special_tokens")) if when_falsy else (
        "extra_special_tokens" in config)
    if "additional_special_tokens" in config and not has_extra:
        config["extra_special_tokens"] = config.pop("additional_special_tokens")


def _merge_special_tokens_map(config: dict, files: Mapping[str, bytes]) -> None:
    """Legacy special_tokens_map.json: its entries override the config's."""
    for key, value in _json(files, "special_tokens_map.json").items():
        if isinstance(value, dict) and key != "extra_special_tokens":
            value = AddedToken(**{k: v for k, v in value.items() if k != "special"}, special=True)
        elif key == "extra_special_tokens" and isinstance(value, list):
            merged = list(config.get("extra_special_tokens") or [])
            for token in value:
                token = AddedToken(**token, special=True) if isinstance(token, dict) else token
                if token not in merged:
                    merged.append(token)
            value = merged
        config[key] = value


def _legacy_added_tokens(config: dict, files: Mapping[str, bytes],
                         backend: Tokenizer) -> dict[int, AddedToken]:
    """{id: token} from added_tokens.json, where tokenizer.json's added tokens win."""
    special = {str(config[k]) for k in NAMED_TOKENS if config.get(k)}
    extra = config.get("extra_special_tokens") or []
    special |= {str(t) for t in extra} if isinstance(extra, list) else set()
    out = {index: AddedToken(text, rstrip=False, lstrip=False, normalized=text not in special,
                             special=text in special)
           for text, index in _json(files, "added_tokens.json").items()}
    out.update(backend.get_added_tokens_decoder())
    return out


def _token_config(config: dict, files: Mapping[str, bytes],
                  backend: Tokenizer) -> tuple[dict[str, Any], list, dict[int, AddedToken]]:
    """(named special tokens with the model-specific "*_token" ones, extra special tokens,
    the added tokens by id), from the config and, without its added_tokens_decoder, the
    legacy files."""
    config = {k: _added_token(v) for k, v in config.items()}
    _rename_additional(config, when_falsy=True)
    if "added_tokens_decoder" in config:
        decoder = {int(i): t if isinstance(t, AddedToken) else AddedToken(**t)
                   for i, t in config["added_tokens_decoder"].items()}
    else:
        _merge_special_tokens_map(config, files)
        decoder = _legacy_added_tokens(config, files, backend)
    _rename_additional(config, when_falsy=False)
    named = {k: config[k] for k in NAMED_TOKENS if config.get(k) is not None}
    for key, value in config.items():
        if key not in NAMED_TOKENS and key.endswith("_token") and _is_token(value):
            named[key] = value
    extra = config.get("extra_special_tokens") or []
    if isinstance(extra, dict):
        named.update({k: v for k, v in extra.items() if _is_token(v)})
        extra = []
    for key, value in named.items():
        if not _is_token(value):
            raise UserError(f"tokenizer_config.json: {key} is not a token: {value!r}")
    return named, list(extra), decoder


def _add_special_tokens(backend: Tokenizer, config: dict,
                        files: Mapping[str, bytes]) -> dict[str, str]:
    """Add to the backend what transformers adds when it loads: every added token of the
    config (again: their flags may change) and the special tokens it lacks; named special
    tokens are special. Returns the special tokens by name."""
    named, extra, decoder = _token_config(config, files, backend)
    tokens = [decoder[i] for i in sorted(decoder)]
    known = {t.content for t in backend.get_added_tokens_decoder().values()}
    known |= {str(t) for t in tokens}
    for token in [*named.values(), *extra]:
        if str(token) not in known:
            tokens.append(token)
            known.add(str(token))
    named_text = {str(t) for t in named.values()}
    for i, token in enumerate(tokens):
        if isinstance(token, str):
            tokens[i] = AddedToken(token, special=True)
        elif not token.special and str(token) in named_text:
            token.special = True
    if tokens:
        backend.add_tokens(tokens)
    return {k: str(v) for k, v in named.items()}


def _clean_up_allowed(config: dict, backend: Tokenizer) -> bool:
    """Whether decode may clean up spaces: transformers never does it for BPE models unless the
    config says `..._for_bpe_even_though_it_will_corrupt_output`."""
    return type(backend.model).__name__ != "BPE" or bool(config.get(
        "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))


def clean_up_tokenization(text: str) -> str:
    """Drop the spaces WordPiece decoding leaves before punctuation and contractions."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                           (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                           (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


def _message(message: Any) -> dict:
    """A message as the template sees it: a copy without None values, its reasoning under
    every name templates read (`thinking`, `reasoning_content`)."""
    if not isinstance(message, dict):
        raise UserError(f"a chat message must be a dict, not {type(message).__name__}")
    message = {k: _copy(v) for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)
    return value


# --- the chat template's jinja2 environment, as transformers builds it ---------------------

class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here
    it renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Dict:
    """The template's `dict`: builds dicts, exposes nothing of the type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(Namespace):
    """The template's `namespace`, refusing names that start with "_"."""

    def __init__(*args, **kwargs):  # noqa: N805 (jinja's signature: `self` may be a field name)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes on a namespace: {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """JSON without jinja's HTML escaping, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format):  # noqa: A002 (transformers' name, for keyword calls)
    return datetime.now().strftime(format)


@lru_cache
def compile_template(source: str) -> jinja2.Template:
    """The chat template compiled in transformers' sandbox (trim_blocks, lstrip_blocks, loop
    controls, `generation` tag, `tojson`, `raise_exception`, `strftime_now`)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_Dict(), namespace=_Namespace)
    return env.from_string(source)
