"""Tokenizers: files carried from Hugging Face directories, rebuilt from GGUF metadata, loaded.

A converted checkpoint keeps the tokenizer files of its source. From a GGUF file they are
rebuilt with the `tokenizers` library (byte-level BPE from `tokenizer.ggml.*`; no torch, no
transformers GGUF reader) as tokenizer.json and tokenizer_config.json. Loading gives a
transformers `PreTrainedTokenizerFast` or a `LightTokenizer` (jaxspec.checkpoint.light_tokenizer),
or None where there are no tokenizer files.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from gguf import GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from jaxspec.checkpoint.gguf_metadata import field
from jaxspec.checkpoint.light_tokenizer import LightTokenizer, read_present
from jaxspec.checkpoint.source import one_line
from jaxspec.errors import UserError

# Files a tokenizer may need, carried from Hugging Face directories into converted checkpoints.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)

# Pre-tokenizer split regexes by `tokenizer.ggml.pre`, as llama.cpp applies them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")
_GPT2 = ("gpt-2", "gpt2", "mpt", "olmo")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
           "deepseek-r1-qwen": _QWEN2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types




def _pre_tokenizer(pre: str):
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    if pre in _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    supported = ", ".join(_DIGITS_THEN_GPT2 + _GPT2 + tuple(_SPLITS))
    raise UserError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: {supported})")


def _post_processor(bos: str | None, add_bos: bool):
    if not add_bos or bos is None:
        return processors.ByteLevel(trim_offsets=False)
    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                         special_tokens=[(bos, 0)])


def build_tokenizer(reader: GGUFReader) -> Tokenizer:
    """A byte-level BPE tokenizer from `tokenizer.ggml.*` metadata (model "gpt2" only)."""
    kind = field(reader, "tokenizer.ggml.model", None)
    if kind != "gpt2":
        raise UserError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2)")
    tokens = field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(field(reader, "tokenizer.ggml.pre", "gpt-2"))
    tok.decoder = decoders.ByteLevel()
    types = field(reader, "tokenizer.ggml.token_type", [])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, kind in zip(tokens, types) if kind == _CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, kind in zip(tokens, types) if kind == _USER_DEFINED])
    bos = _token(reader, tokens, "bos_token_id")
    tok.post_processor = _post_processor(bos, bool(field(reader, "tokenizer.ggml.add_bos_token",
                                                          False)))
    return tok


def _token(reader: GGUFReader, tokens: list[str], key: str) -> str | None:
    index = field(reader, f"tokenizer.ggml.{key}", None)
    return tokens[index] if index is not None and 0 <= index < len(tokens) else None


def tokenizer_config(reader: GGUFReader) -> dict[str, Any]:
    """tokenizer_config.json for the rebuilt tokenizer (special tokens, chat template)."""
    tokens = field(reader, "tokenizer.ggml.tokens")
    out: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        out[name] = _token(reader, tokens, key)
    template = field(reader, "tokenizer.chat_template", None)
    if template is not None:
        out["chat_template"] = template
    return out


def gguf_tokenizer_files(reader: GGUFReader) -> dict[str, bytes]:
    """{"tokenizer.json": ..., "tokenizer_config.json": ...}; empty when there is no vocab."""
    if "tokenizer.ggml.tokens" not in reader.fields:
        return {}
    return {
        "tokenizer.json": build_tokenizer(reader).to_str().encode("utf-8"),
        "tokenizer_config.json": json.dumps(tokenizer_config(reader), indent=2,
                                            ensure_ascii=False).encode("utf-8"),
    }


def read_tokenizer_files(directory: str) -> dict[str, bytes]:
    """{file name: contents} of the tokenizer files present in directory."""
    return read_present(directory, TOKENIZER_FILES)


def load_tokenizer(directory: str, kind: str = "transformers"):
    """The tokenizer in directory, or None without tokenizer files. kind: "transformers" (a
    transformers fast tokenizer) or "light" (a LightTokenizer: the same ids, text and chat
    template without importing transformers)."""
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return None
    if kind == "light":
        return LightTokenizer.from_dir(directory)
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(directory)
    except Exception as e:  # transformers raises many types for bad tokenizer files
        raise UserError(f"cannot load the tokenizer in {directory}: "
                        f"{one_line(e)[:300]}") from None


def tokenizer_from_files(files: dict[str, bytes], kind: str = "transformers"):
    """Load a tokenizer of `kind` (load_tokenizer) from in-memory tokenizer files."""
    if "tokenizer.json" not in files:
        return None
    if kind == "light":
        return LightTokenizer.from_files(files)
    with tempfile.TemporaryDirectory(prefix="jaxspec-tokenizer-") as tmp:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        return load_tokenizer(tmp)


def kind_of(tokenizer) -> str:
    """The kind ("light" or "transformers") of a loaded tokenizer."""
    return "light" if isinstance(tokenizer, LightTokenizer) else "transformers"


def encode_prompt(model, prompt: str, chat_template: bool,
                  system: str | None = None) -> list[int]:
    """Token ids of the prompt: the chat template's rendering if the tokenizer has one, with
    a system message first when `system` is given (which needs a chat template)."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise UserError(f"{model.path} has no tokenizer files (tokenizer.json): cannot encode "
                        "a text prompt")
    if not (chat_template and getattr(tokenizer, "chat_template", None)):
        if system is not None:
            raise UserError("a system message needs a chat template: " + (
                f"{model.path} has none" if chat_template else "the prompt is encoded raw"))
        return list(tokenizer.encode(prompt))  # adds BOS where the tokenizer does
    messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
    except Exception as e:  # the template is the model's code: any error is the input's
        reason = str(e).removeprefix("the chat template failed: ") if isinstance(
            e, UserError) else f"{type(e).__name__}: {e}"  # a LightTokenizer's, or another's
        raise UserError(f"the chat template of {model.path} failed: {reason} "
                        "(try --no-chat-template)") from None
    return list(tokenizer.encode(text, add_special_tokens=False))  # the template has BOS
