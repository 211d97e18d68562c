"""Shared test helpers (one module; test files import from it, never from conftest).

Tiny random models for the sampling, rejection and loop tests: `init_params` draws weights with
std 0.02, which gives nearly uniform logits; `tiny_params` scales every projection so that
argmaxes are decisive and distributions are peaked and varied.

Tiny Hugging Face models, a tiny tokenizer and tiny GGUF files for the parity, checkpoint and
CLI tests:

    path = tiny_hf_model("qwen3", tmp_path)           # a Hugging Face directory (safetensors)
    model = jaxspec.load_model(path)

Every such model is small (vocab 100, hidden 64, 2 layers) and built in well under a second once
torch and transformers are imported. Weights are re-initialised with std 0.3 so that mapping
mistakes show up as large logit differences. torch is imported lazily (test-only dependency).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from jaxspec.models import decoder, layout
from jaxspec.models.cache import bucket, init_cache
from jaxspec.models.config import ModelConfig
from jaxspec.models.loaded import Model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
KINDS = ("llama", "llama3", "mistral", "qwen2", "qwen3")
# XLA without LLVM's optimizations: about 40% less compile time (measured on this suite's
# loop programs). The tiny-model tests check jaxspec's logic, not the machine code XLA
# generates for users (whose logits it changes in the last bits), and compile with it where
# JAX runs on the CPU (conftest.py sets it for the whole run); tests marked slow or optimized
# compile as users do.
UNOPTIMIZED_XLA = "--xla_backend_optimization_level=0"

# Tiny byte-level BPE vocabulary: 3 specials, the 95 printable ASCII bytes, newline, one merge.
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID = 1, 2
TOKENIZER_VOCAB = 100
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

_BASE = dict(vocab_size=TOKENIZER_VOCAB, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=BOS_ID,
             eos_token_id=EOS_ID, tie_word_embeddings=False)
_KIND_CONFIG = {
    "llama": dict(model_type="llama", tie_word_embeddings=True),
    "llama3": dict(model_type="llama", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "mistral": dict(model_type="mistral", sliding_window=4),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=32),
}


def tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the tiny byte-level BPE: specials, ASCII 32..126 (space as 'Ġ'), 'Ċ'."""
    chars = ["Ġ" if c == 32 else chr(c) for c in range(32, 127)]
    tokens = list(SPECIALS) + chars + ["Ċ", "Ġt"]
    assert len(tokens) == TOKENIZER_VOCAB
    return {t: i for i, t in enumerate(tokens)}, [("Ġ", "t")]


def tiny_tokenizer():
    """A tokenizers.Tokenizer over tiny_vocab(), pre-tokenized like SmolLM2 (digits, byte-level)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = tiny_vocab()
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    return tok


def save_tiny_tokenizer(path: str) -> None:
    """Write tokenizer.json, tokenizer_config.json (with chat template) into path."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer(), bos_token=SPECIALS[BOS_ID],
                                   eos_token=SPECIALS[EOS_ID], unk_token=SPECIALS[0],
                                   pad_token=SPECIALS[EOS_ID])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def tiny_hf_config(kind: str, *, vocab_size: int = TOKENIZER_VOCAB, **overrides):
    """A transformers config of the given kind (see KINDS); overrides win."""
    from transformers import AutoConfig

    values = {**_BASE, **_KIND_CONFIG[kind], "vocab_size": vocab_size, **overrides}
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def randomize(model, *, seed: int = 0, std: float = 0.3) -> None:
    """Normal(0, std) weights and biases; norm weights 1 + Normal(0, 0.1)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else std * noise)


def tiny_torch_model(kind: str, *, vocab_size: int = TOKENIZER_VOCAB, seed: int = 0, **overrides):
    """A randomized transformers CausalLM (fp32, eager attention, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_hf_config(kind, vocab_size=vocab_size, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                             dtype=torch.float32)
    randomize(model, seed=seed)
    return model.eval()


def tiny_hf_model(kind: str, tmp_path, *, vocab_size: int = TOKENIZER_VOCAB, seed: int = 0,
                  with_tokenizer: bool = True, **overrides) -> str:
    """Save a tiny random model of `kind` as a Hugging Face dir under tmp_path; returns its path.

    The tokenizer (tiny byte-level BPE, ids 0-2 special, BOS 1, EOS 2) needs vocab_size >= 100.
    """
    path = os.path.join(str(tmp_path), f"hf-{kind}-{seed}")
    model = tiny_torch_model(kind, vocab_size=vocab_size, seed=seed, **overrides)
    model.save_pretrained(path, safe_serialization=True)
    if with_tokenizer:
        assert vocab_size >= TOKENIZER_VOCAB, "the tiny tokenizer needs vocab_size >= 100"
        save_tiny_tokenizer(path)
    return path


def hf_logits(path_or_model, tokens: np.ndarray) -> np.ndarray:
    """Reference logits [B, T, V] from transformers (fp32) for tokens [B, T]."""
    import torch
    from transformers import AutoModelForCausalLM

    model = path_or_model
    if isinstance(model, (str, os.PathLike)):
        model = AutoModelForCausalLM.from_pretrained(model, attn_implementation="eager",
                                                     dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens))).logits.numpy()


def jaxspec_logits(model, tokens: np.ndarray) -> np.ndarray:
    """Logits [B, T, V] of a jaxspec Model for tokens [B, T] at positions 0..T-1."""
    import jax.numpy as jnp

    tokens = jnp.asarray(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    kv = init_cache(model.config, tokens.shape[0], bucket(tokens.shape[1]),
                    model.params["embed"].dtype, model.layout or layout.default())
    logits, _, _ = decoder.forward(model.config, model.params, tokens, positions, kv)
    return np.asarray(logits)


def random_tokens(vocab_size: int = TOKENIZER_VOCAB, shape=(2, 12), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=shape, dtype=np.int64)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation (what GGUF files store)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _gguf_tensor_name(hf_name: str) -> str:
    from jaxspec.checkpoint.gguf_source import GLOBAL_NAMES, LAYER_NAMES

    inverse = {v: k for k, v in GLOBAL_NAMES.items()}
    if hf_name in inverse:
        return inverse[hf_name]
    _, _, index, rest = hf_name.split(".", 3)
    return f"blk.{index}.{ {v: k for k, v in LAYER_NAMES.items()}[rest]}"


def _gguf_metadata(writer, config, *, with_tokenizer: bool) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    if with_tokenizer:
        vocab, merges = tiny_vocab()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm")
        writer.add_token_list(list(vocab))
        writer.add_token_types([3 if t in SPECIALS else 1 for t in vocab])
        writer.add_token_merges([" ".join(m) for m in merges])
        writer.add_bos_token_id(BOS_ID)
        writer.add_eos_token_id(EOS_ID)
        writer.add_unk_token_id(0)
        writer.add_pad_token_id(EOS_ID)
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHAT_TEMPLATE)


def write_tiny_gguf(torch_model, path: str, *, qtype="F32", with_tokenizer: bool = True) -> str:
    """Write a llama/qwen2/qwen3 transformers model as llama.cpp would: GGUF names, and for
    llama the q/k rows permuted.

    qtype ("F32", "Q8_0", "Q4_1", "Q4_K", ..., or a function of the Hugging Face tensor name
    giving one) applies to 2-D weights; norms and biases stay F32.
    """
    import gguf

    config = torch_model.config
    arch = config.model_type
    writer = gguf.GGUFWriter(path, arch)
    _gguf_metadata(writer, config, with_tokenizer=with_tokenizer)
    for name, tensor in torch_model.state_dict().items():
        quant = gguf.GGMLQuantizationType[qtype(name) if callable(qtype) else qtype]
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        w = tensor.numpy().astype(np.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            w = permute_rows(w, heads)
        if w.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(_gguf_tensor_name(name), gguf_quantize(w, quant), raw_dtype=quant)
        else:
            writer.add_tensor(_gguf_tensor_name(name), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_quantize(w: np.ndarray, quant) -> np.ndarray:
    """w's GGUF blocks of type `quant` (the K-quants by tests/kquants.py: gguf cannot)."""
    import gguf
    import kquants

    encoders = {gguf.GGMLQuantizationType.Q4_K: kquants.quantize_q4_k,
                gguf.GGMLQuantizationType.Q5_K: kquants.quantize_q5_k,
                gguf.GGMLQuantizationType.Q6_K: kquants.quantize_q6_k}
    return encoders[quant](w) if quant in encoders else gguf.quants.quantize(w, quant)


def quantize_roundtrip(torch_model, qtype: str) -> None:
    """Replace every 2-D weight by its dequantize(quantize(w)) so GGUF files hold it exactly."""
    import gguf
    import torch

    quant = gguf.GGMLQuantizationType[qtype]
    with torch.no_grad():
        for p in torch_model.parameters():
            if p.ndim == 2:
                w = p.numpy().astype(np.float32)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf_quantize(w, quant),
                                                                quant).reshape(w.shape)))


def script_json(code: str, *args: str, cache: str, compile_cache: str = "1") -> dict:
    """Run `python -c code *args` from the repository root with $JAXSPEC_CACHE = cache and
    $JAXSPEC_COMPILE_CACHE = compile_cache; the JSON object its last stdout line holds."""
    env = {**os.environ, "JAXSPEC_CACHE": cache, "JAXSPEC_COMPILE_CACHE": compile_cache}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def truncate_largest_file(folder: str) -> None:
    """Cut the largest file under folder (e.g. an Orbax checkpoint's tensor data) to a tenth of
    its size."""
    files = [os.path.join(parent, name) for parent, _, names in os.walk(folder)
             for name in names]
    largest = max(files, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 10)


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def transformers_gguf_model(path: str):
    """transformers' own GGUF conversion (its dequantization and un-permutation), fp32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = os.path.split(path)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    return model.eval()


# --- tiny random jaxspec models ----------------------------------------------------------

DENSE = ("embed", "lm_head", "wqkv", "wo", "w_gate_up", "w_down")


def plain_params(model: Model) -> dict:
    """A loaded model's params with every weight a plain array (CPU panels unpacked)."""
    return layout.apply(layout.CPU_XLA if (model.layout or layout.default()).output_copy
                        else layout.ACCELERATOR, model.params, model.config.tie_word_embeddings)


def tiny_config(*, vocab: int = 48, hidden: int = 32, layers: int = 1, heads: int = 4,
                kv_heads: int = 2, intermediate: int = 64, max_positions: int = 256,
                eos: tuple[int, ...] = (), tied: bool = False) -> ModelConfig:
    return ModelConfig(
        model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        eos_token_ids=tuple(eos))


def _scale(tree, factor: float):
    """Multiply every dense weight (not the norms) of a params tree by factor."""
    if isinstance(tree, dict):
        return {k: (v * factor if k in DENSE else _scale(v, factor)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_scale(v, factor) for v in tree]
    return tree


def tiny_params(config: ModelConfig, seed: int = 0, *, std: float = 0.5):
    """Random params whose dense weights have standard deviation `std` (not 0.02)."""
    params = decoder.init_params(config, jax.random.key(seed), jnp.float32)
    return _scale(params, std / 0.02)


def tiny_model(seed: int = 0, *, std: float = 0.5, **config_kwargs) -> Model:
    config = tiny_config(**config_kwargs)
    return Model(config=config, params=tiny_params(config, seed, std=std))


def perturbed(target: Model, *, noise: float, seed: int = 1) -> Model:
    """A draft close to the target: its params plus Gaussian noise of std `noise`."""
    leaves, treedef = jax.tree.flatten(target.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [leaf + noise * jax.random.normal(k, leaf.shape, leaf.dtype)
             for leaf, k in zip(leaves, keys)]
    return dataclasses.replace(target, params=jax.tree.unflatten(treedef, noisy))


def resized_vocab(m: Model, vocab: int, *, seed: int = 2, std: float = 0.5) -> Model:
    """The same model with its embedding/output tables cut or padded (random rows) to `vocab`."""
    params = dict(m.params)
    old = m.config.vocab_size
    key_e, key_h = jax.random.split(jax.random.key(seed))
    if vocab <= old:
        params["embed"] = params["embed"][:vocab]
        if "lm_head" in params:
            params["lm_head"] = params["lm_head"][:, :vocab]
    else:
        extra = vocab - old
        params["embed"] = jnp.concatenate(
            [params["embed"], std * jax.random.normal(key_e, (extra, params["embed"].shape[1]))])
        if "lm_head" in params:
            params["lm_head"] = jnp.concatenate(
                [params["lm_head"],
                 std * jax.random.normal(key_h, (params["lm_head"].shape[0], extra))], axis=1)
    config = dataclasses.replace(m.config, vocab_size=vocab)
    return dataclasses.replace(m, config=config, params=params)


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced(config: ModelConfig, params, tokens):
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    cache = init_cache(config, B, T, jnp.float32, layout.default())
    logits, _, _ = decoder.forward(config, params, tokens, positions, cache)
    return logits


def causal_attention(q, k, v, window=None) -> np.ndarray:
    """float64 causal softmax attention of positions 0..T-1: q[B, T, K, G, Dh], k, v [B, T, K,
    Dh], query t seeing keys s <= t (and s > t - window)."""
    B, T, K, G, Dh = q.shape
    out = np.zeros(q.shape, np.float64)
    for b in range(B):
        for t in range(T):
            lo = 0 if window is None else max(0, t - window + 1)
            for h in range(K):
                s = q[b, t, h].astype(np.float64) @ k[b, lo:t + 1, h].T.astype(np.float64)
                s = s / np.sqrt(Dh)
                w = np.exp(s - s.max(-1, keepdims=True))
                out[b, t, h] = (w / w.sum(-1, keepdims=True)) @ v[b, lo:t + 1, h]
    return out


def full_logits(config: ModelConfig, params, tokens) -> np.ndarray:
    """Teacher-forced logits [B, T, V] of tokens[B, T]: positions 0..T-1, a fresh cache.

    Rows are right-padded to a multiple of 32 before the (jitted) forward, so successive calls
    with growing sequences compile rarely; causal attention makes the padding invisible.
    """
    tokens = np.asarray(tokens, np.int32)
    B, T = tokens.shape
    padded = np.zeros((B, -(-T // 32) * 32), np.int32)
    padded[:, :T] = tokens
    return np.asarray(_teacher_forced(config, params, jnp.asarray(padded)))[:, :T]


def greedy_reference(m: Model, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy decoding by re-running every full sequence without a cache at each step.

    Rows stop after an EOS id of the model's config or after max_new tokens.
    """
    eos = set(m.config.eos_token_ids)
    seqs, done = [list(p) for p in prompts], [False] * len(prompts)
    width = max(len(p) for p in prompts) + max_new
    for _ in range(max_new):
        batch = np.zeros((len(seqs), width), np.int32)
        for b, s in enumerate(seqs):
            batch[b, : len(s)] = s
        logits = full_logits(m.config, m.params, batch)
        for b, s in enumerate(seqs):
            if not done[b]:
                s.append(int(np.argmax(logits[b, len(s) - 1])))
                done[b] = s[-1] in eos
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def chi2_pvalue(counts, probs, *, min_expected: float = 5.0) -> float:
    """Chi-square goodness of fit of counts[K] to probs[K] (float64, renormalised).

    Cells whose expected count is below min_expected are merged into one cell (dropped if that
    merged cell is still too small). A count in a cell of probability zero gives p-value 0.
    """
    counts = np.asarray(counts, np.float64).ravel()
    probs = np.asarray(probs, np.float64).ravel()
    if np.any(counts[probs <= 0] > 0):
        return 0.0
    expected = probs / probs.sum() * counts.sum()
    big = expected >= min_expected
    observed, wanted = list(counts[big]), list(expected[big])
    if expected[~big].sum() >= min_expected:
        observed.append(counts[~big].sum())
        wanted.append(expected[~big].sum())
    observed, wanted = np.asarray(observed), np.asarray(wanted)
    statistic = float(((observed - wanted) ** 2 / wanted).sum())
    return float(stats.chi2.sf(statistic, df=len(observed) - 1))


def trained_head(target: Model, *, draft_vocab: int, steps: int = 60, rows: int = 48,
                 new_tokens: int = 16, seed: int = 0, directory: str | None = None,
                 learning_rate: float = 1e-2):
    """(HeadConfig, head params with d2t, Trainer, records): a draft head trained for `steps`
    steps on `rows` greedy continuations of random prompts by `target` (the last 8 rows held
    out). Checkpoints go to `directory` (a temporary one by default)."""
    import tempfile

    from jaxspec.drafts import head as heads
    from jaxspec.training import record, trainer

    rng = np.random.default_rng(seed)
    vocab = target.config.vocab_size
    prompts = [rng.integers(3, vocab, rng.integers(2, 6)).tolist() for _ in range(rows)]
    layers = heads.default_layers(target.config.num_layers)
    records = record.record(target, prompts, new_tokens=new_tokens, layers=layers, batch=16,
                            k=8, progress=False)
    train, held_out = records.take(slice(0, rows - 8)), records.take(slice(rows - 8, rows))
    d2t = trainer.draft_vocabulary(train, draft_vocab, target.config.eos_token_ids, vocab)
    config = heads.HeadConfig(target.config, layers, len(d2t))
    train_config = trainer.TrainConfig(steps=steps, batch=8, draft_vocab=draft_vocab,
                                       learning_rate=learning_rate, warmup=5, seed=seed,
                                       eval_every=steps, checkpoint_every=steps, eval_rows=8)
    fitter = trainer.Trainer(target, config, d2t, train_config)
    with tempfile.TemporaryDirectory() as tmp:
        params, _ = fitter.fit(train, held_out, directory or tmp, progress=False)
    return config, {**params, "d2t": jnp.asarray(d2t)}, fitter, (train, held_out)


def successor_model(vocab: int = 40, *, seed: int = 0, sharpness: float = 1.0,
                    eos: tuple[int, ...] = ()) -> Model:
    """A tiny target whose next token is mostly a fixed permutation of the current one
    (attention and MLP scaled down, lm_head[:, π(i)] = embed[i] · sharpness): its greedy text
    is learnable by a draft head, and `sharpness` sets how peaked its distributions are."""
    model = tiny_model(seed, std=0.5, vocab=vocab, layers=2, eos=eos)
    params = _scale(model.params, 0.3)
    params["embed"] = model.params["embed"]
    perm = np.random.default_rng(seed).permutation(vocab)
    head = np.zeros((model.config.hidden_size, vocab), np.float32)
    head[:, perm] = np.asarray(model.params["embed"]).T * sharpness
    params["lm_head"] = jnp.asarray(head)
    return dataclasses.replace(model, params=params)


def rows_unlike_steps(config: ModelConfig, params, tokens, P: int, T: int, dtype) -> list[int]:
    """The positions t < T where a T-token forward of tokens[:, P:P + T] (a verify, after a
    prefill of P tokens) differs in any bit of its logits or hidden state from the one-token
    step at P + t, on the CPU layout with jaxspec's compiler options (batch 1, 128 cache slots)."""
    forward = functools.partial(_options_forward(), config, params)
    cache = init_cache(config, 1, 128, jnp.dtype(dtype), layout.CPU)
    *_, cache = forward(tokens[:, :P], jnp.arange(P)[None], cache)
    verified = forward(tokens[:, P:P + T], jnp.arange(P, P + T)[None], cache)[:2]
    differing = []
    for t in range(T):
        *step, cache = forward(tokens[:, P + t:P + t + 1], jnp.asarray([[P + t]]), cache)
        if any(np.any(np.asarray(a[0, 0]) != np.asarray(b[0, t])) for a, b in zip(step, verified)):
            differing.append(t)
    return differing


@functools.cache
def _options_forward():
    import jaxspec

    return jax.jit(decoder.forward, static_argnums=0, compiler_options=jaxspec.compiler_options())
