"""Read a GGUF file (llama.cpp's format) as a checkpoint: config, tensors and tokenizer.

Tensors are dequantized with numpy (`gguf.quants.dequantize`) and renamed to the Hugging Face
names that jaxspec.keymap expects. llama.cpp's converter permutes the rows of the q and k
projections of Llama models (its RoPE rotates adjacent pairs, Hugging Face's rotates halves);
that permutation is undone here. The tokenizer is rebuilt from the metadata with the
`tokenizers` library (no torch, no transformers GGUF reader) and saved as tokenizer.json.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from jaxspec.config import ModelConfig
from jaxspec.errors import UserError
from jaxspec.hf_import import Source

# GGUF architecture -> whether llama.cpp permuted the q/k rows of that architecture.
ARCHITECTURES = {"llama": True, "qwen2": False, "qwen3": False}

# GGUF tensor names -> Hugging Face names (per layer, then global).
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

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


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def read_gguf(path: str) -> GGUFReader:
    """Open (memory-map) a GGUF file; a corrupted or truncated file raises UserError."""
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises many types on bad bytes
        raise UserError(f"cannot read GGUF file {path} (truncated or corrupted?): "
                        f"{_one_line(e)}") from None


def field(reader: GGUFReader, key: str, default: Any = KeyError) -> Any:
    """A metadata value (str, number, bool or list); missing and no default -> UserError."""
    if key not in reader.fields:
        if default is KeyError:
            raise UserError(f"GGUF file has no metadata key {key}")
        return default
    return reader.fields[key].contents()


def _architecture(reader: GGUFReader) -> str:
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"unsupported GGUF architecture {arch!r} "
                        f"(supported: {', '.join(ARCHITECTURES)})")
    return arch


def _check_rope(reader: GGUFReader, arch: str, names: set[str], head_dim: int) -> None:
    scaling = field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in names:
        raise UserError("GGUF files with RoPE scaling are not supported; "
                        "convert the Hugging Face checkpoint instead")
    if field(reader, f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise UserError("GGUF files with partial rotary embeddings are not supported")


def _eos_ids(reader: GGUFReader) -> tuple[int, ...]:
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    ids = [field(reader, f"tokenizer.ggml.{k}", None) for k in keys]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def read_config(reader: GGUFReader) -> ModelConfig:
    """ModelConfig from GGUF metadata; flags (bias, q/k norm, tied output) from the tensors."""
    arch = _architecture(reader)
    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise UserError("GGUF file has no token_embd.weight tensor")
    hidden = int(field(reader, f"{arch}.embedding_length"))
    heads = int(field(reader, f"{arch}.attention.head_count"))
    head_dim = int(field(reader, f"{arch}.attention.key_length", hidden // heads))
    _check_rope(reader, arch, names, head_dim)
    return ModelConfig(
        model_type=arch,
        vocab_size=int(_tensor(reader, "token_embd.weight").shape[1]),
        hidden_size=hidden,
        intermediate_size=int(field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(field(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(field(reader, f"{arch}.context_length", 2048)),
        rms_norm_eps=float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_ids=_eos_ids(reader),
    )


def _tensor(reader: GGUFReader, name: str):
    for t in reader.tensors:
        if t.name == name:
            return t
    raise UserError(f"GGUF file has no tensor {name}")


def hf_name(gguf_name: str) -> str | None:
    """Hugging Face name of a GGUF tensor name (None for tensors jaxspec does not use)."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's RoPE row permutation of a q or k projection w[n_head * Dh, ...].

    llama.cpp: w.reshape(n_head, 2, Dh // 2, ...).swapaxes(1, 2); this is its inverse.
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _dequantized(tensor) -> np.ndarray:
    """The tensor as float32 in Hugging Face orientation, shape reversed from GGUF's ne."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    try:
        return np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)
    except NotImplementedError:
        raise UserError(f"GGUF tensor {tensor.name}: quantization {tensor.tensor_type.name} "
                        "is not supported") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"cannot read GGUF tensor {tensor.name}: {_one_line(e)}") from None


def tensor_getter(reader: GGUFReader, config: ModelConfig):
    """get(Hugging Face name) -> float32 array, with llama's q/k permutation undone."""
    by_name = {hf_name(t.name): t for t in reader.tensors if hf_name(t.name)}
    permuted = ARCHITECTURES[config.model_type]

    def get(name: str) -> np.ndarray:
        if name not in by_name:
            raise UserError(f"tensor {name} is missing from the GGUF file")
        w = _dequantized(by_name[name])
        if permuted and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
            w = unpermute_rows(w, heads)
        return w

    return get


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


def read_tokenizer_files(reader: GGUFReader) -> dict[str, bytes]:
    """{"tokenizer.json": ..., "tokenizer_config.json": ...}; empty when there is no vocab."""
    if "tokenizer.ggml.tokens" not in reader.fields:
        return {}
    return {
        "tokenizer.json": build_tokenizer(reader).to_str().encode("utf-8"),
        "tokenizer_config.json": json.dumps(tokenizer_config(reader), indent=2,
                                            ensure_ascii=False).encode("utf-8"),
    }


@contextlib.contextmanager
def open_gguf(path: str) -> Iterator[Source]:
    """Open a GGUF file as a Source (Hugging Face tensor names, float32 tensors)."""
    reader = read_gguf(path)
    config = read_config(reader)
    yield Source(config, tensor_getter(reader, config), read_tokenizer_files(reader))
