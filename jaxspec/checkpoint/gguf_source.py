"""A GGUF file (llama.cpp's format) as a Source: config, tensors and tokenizer.

Tensors are dequantized with numpy (`gguf.quants.dequantize`) and renamed to the Hugging Face
names that checkpoint.keymap expects. llama.cpp's converter permutes the rows of the q and k
projections of Llama models (its RoPE rotates adjacent pairs, Hugging Face's rotates halves);
that permutation is undone here. The tokenizer is rebuilt from the metadata by
checkpoint.tokenizer (no torch, no transformers GGUF reader).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import Q4_K, dequantize

from jaxspec.checkpoint.gguf_metadata import field, read_gguf
from jaxspec.checkpoint.source import Source, missing_tensor, one_line
from jaxspec.checkpoint.tokenizer import gguf_tokenizer_files
from jaxspec.errors import UserError
from jaxspec.models import quantized
from jaxspec.models.config import ModelConfig

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
        raise UserError(f"cannot read GGUF tensor {tensor.name}: {one_line(e)}") from None


def _halves(a: np.ndarray) -> np.ndarray:
    """[n, 2] fp16 bytes -> [n, 1] fp32."""
    return np.ascontiguousarray(a).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, width: int = 16) -> np.ndarray:
    """[n, width · c] bytes -> [n, 2 · width · c] quants: each `width` bytes' low nibbles, then
    their high ones."""
    chunks = qs.reshape(qs.shape[0], -1, 1, width)
    return np.concatenate([chunks & 15, chunks >> 4], axis=2).reshape(qs.shape[0], -1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes -> [n, 32] bits (a little-endian uint32's bits 0..31)."""
    return ((qh.copy().view(np.uint32) >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _q4_1(b):
    return "q4_1", _nibbles(b[:, 4:]), _halves(b[:, :2]), _halves(b[:, 2:4])


def _q4_0(b):  # d·(q − 8) = d·q + (−8d): q4_1 with an exact fp16 offset (unless it overflows)
    d = _halves(b[:, :2])
    if np.abs(d).max(initial=0) * 8 > np.finfo(np.float16).max:
        return None
    return "q4_1", _nibbles(b[:, 2:]), d, -8 * d


def _q8_0(b):
    return "q8_0", b[:, 2:].view(np.int8), _halves(b[:, :2]), None


def _q5_0(b):  # d·(q − 16), the 5th bits in 4 bytes: q8_0 with the quant q − 16
    q = _nibbles(b[:, 6:]) | (_fifth_bits(b[:, 2:6]) << 4)
    return "q8_0", q.astype(np.int8) - 16, _halves(b[:, :2]), None


def _q5_1(b):  # d·q + m, q 5-bit: q8_dm
    q = _nibbles(b[:, 8:]) | (_fifth_bits(b[:, 4:8]) << 4)
    return quantized.widen(q, _halves(b[:, :2]), _halves(b[:, 2:4]))


def _k_scales(b):
    """A Q4_K or Q5_K block's 8 sub-block scales d·sc and offsets −dmin·m [n, 8] (exact)."""
    sc, mins = Q4_K.get_scale_min(b[:, 4:16])
    return (_halves(b[:, :2]) * sc.astype(np.float32),
            -(_halves(b[:, 2:4]) * mins.astype(np.float32)))


def _q4_k(b):  # 8 sub-blocks of 32: d·sc·q − dmin·m, sc and m 6-bit
    return "q4_k", _nibbles(b[:, 16:], 32), *_k_scales(b)


def _q5_k(b):  # Q4_K with a 5th bit per quant (bit s of byte i: sub-block s, weight i)
    low = _nibbles(b[:, 48:], 32).reshape(len(b), 8, 32)
    high = (b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    return quantized.widen((low | (high << 4)).reshape(len(b), -1), *_k_scales(b))


def _q6_k(b):  # 16 sub-blocks of 16: d·sc·(q − 32), q 6-bit (low 4 bits in ql, high 2 in qh)
    low = _nibbles(b[:, :128], 64).reshape(len(b), 2, 128)
    high = b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
    q = low | ((high & 3).reshape(len(b), 2, 128) << 4)
    d = _halves(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)  # [n, 16]
    return "q6_k", q.reshape(len(b), -1).astype(np.int8) - 32, d, None


# GGUF quantization types whose blocks the CPU kernel reads (models.quantized): bytes per
# block of `weights`, and the (kind, quants, scales, offsets) of n blocks' bytes [n, bytes],
# the scales and offsets one per block or sub-block, exactly as gguf.quants.dequantize uses
# them.
BLOCK_TYPES = {"Q4_0": (18, 32, _q4_0), "Q4_1": (20, 32, _q4_1), "Q5_0": (22, 32, _q5_0),
               "Q5_1": (24, 32, _q5_1), "Q8_0": (34, 32, _q8_0), "Q4_K": (144, 256, _q4_k),
               "Q5_K": (176, 256, _q5_k), "Q6_K": (210, 256, _q6_k)}


def _blocks(tensor):
    """`blocks_of` a GGUF tensor in Hugging Face orientation [out, in]."""
    return blocks_of(tensor.tensor_type.name, tensor.data,
                     tuple(int(n) for n in reversed(tensor.shape)))


def blocks_of(type_name: str, raw, shape: tuple[int, ...]):
    """(kind, q, d, m) of a tensor's raw GGUF bytes of type `type_name` (one of BLOCK_TYPES)
    and shape [out, in]: q its quants, d and m (None for kinds without offsets) each weight's
    scale and offset (fp32); None for other types, or blocks the kernel cannot hold."""
    if type_name not in BLOCK_TYPES:
        return None
    size, weights, parse = BLOCK_TYPES[type_name]
    parsed = parse(np.asarray(raw).view(np.uint8).reshape(-1, size))
    if parsed is None:
        return None
    kind, q, d, m = parsed

    def per_weight(a):  # [n, sub-blocks] -> [out, in]
        return np.repeat(a, weights // a.shape[1], axis=1).reshape(shape)

    return kind, q.reshape(shape), per_weight(d), None if m is None else per_weight(m)


def block_getter(reader: GGUFReader, config: ModelConfig):
    """get(Hugging Face name) -> `_blocks` of that tensor (None when the kernel cannot read its
    blocks), with llama's q/k permutation undone as `tensor_getter` undoes it."""
    by_name = {hf_name(t.name): t for t in reader.tensors if hf_name(t.name)}

    def get(name: str):
        blocks = _blocks(by_name[name]) if name in by_name else None
        if blocks is None:
            return None
        kind, *arrays = blocks
        return kind, *(None if a is None else _unpermuted(config, name, a) for a in arrays)

    return get


def _unpermuted(config: ModelConfig, name: str, w: np.ndarray) -> np.ndarray:
    """w [out, ...] with llama.cpp's q/k row permutation undone where it applies."""
    if not (ARCHITECTURES[config.model_type]
            and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight"))):
        return w
    return unpermute_rows(w, config.num_heads if ".q_proj." in name else config.num_kv_heads)


def tensor_getter(reader: GGUFReader, config: ModelConfig):
    """get(Hugging Face name) -> float32 array, with llama's q/k permutation undone."""
    by_name = {hf_name(t.name): t for t in reader.tensors if hf_name(t.name)}

    def get(name: str) -> np.ndarray:
        if name not in by_name:
            raise missing_tensor(name, "the GGUF file")
        return _unpermuted(config, name, _dequantized(by_name[name]))

    return get


@contextlib.contextmanager
def open_gguf(path: str) -> Iterator[Source]:
    """Open a GGUF file as a Source (Hugging Face tensor names, float32 tensors)."""
    reader = read_gguf(path)
    config = read_config(reader)
    yield Source(config, tensor_getter(reader, config), gguf_tokenizer_files(reader),
                 blocks=block_getter(reader, config))
