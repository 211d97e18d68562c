"""Public Python API: `SpeculativeDecoder(target, draft, ...).generate(prompts, ...)`.

The decoder validates input, checks that the run fits in its device's memory
(jaxspec.memory), pads the batch into bucketed shapes (so new prompt lengths rarely
recompile), compiles the loop once per shape and sampling mode, runs it, and returns new tokens
plus statistics. The pure function underneath is `jaxspec.generate_tokens`
(`jaxspec.decode.loop.generate_tokens`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxspec import compile_cache, devices, kernels, memory, program_cache, tuning, validation
from jaxspec.checkpoint import names
from jaxspec.decode import loop, sampling
from jaxspec.decode.sizing import loop_max_len, prompt_width
from jaxspec.decode.state import DecodeState, LoopSpec
from jaxspec.decode.stats import summarize
from jaxspec.drafts import registry
from jaxspec.drafts.base import Draft
from jaxspec.drafts.head import HeadDraft
from jaxspec.drafts.lookup_first import LookupFirst
from jaxspec.errors import UserError
from jaxspec.models import layout as layouts
from jaxspec.models import sharding
from jaxspec.models.loaded import Model

DEFAULT_GAMMA = 4  # γ when neither the caller nor the draft picks one


@dataclasses.dataclass
class GenerateOutput:
    tokens: list[list[int]]  # new tokens per row, EOS included if produced
    stats: dict


def resolve_draft(draft, target, device=None, layout=None):
    """(draft object for the loop, draft model holding its params or None, head params or None).

    "default" is the draft head shipped for the target with prompt lookup first
    (`default_draft`), or none. A path or model name is loaded here: a draft-head checkpoint as
    a head (its params are then {"head": ..., "embed": the target's embedding}), anything else
    as a model in the target's dtype. Names like "ngram:3" and "layerskip:8", loaded models and
    Draft objects go to the draft registry; "DRAFT+ngram:N" resolves DRAFT and puts prompt
    lookup first. With a `device` (a jax.Device), a loaded or given draft model is placed
    there in `layout`.
    """
    from jaxspec.checkpoint import head_store

    if not (draft is None or isinstance(draft, (str, Model, head_store.LoadedHead, Draft))):
        raise UserError(f"draft must be a name or path, a model from load_model, a draft head "
                        f"or a Draft object, got {validation.show(draft)}")
    head_layout = layout or target.layout or layouts.default()
    name = registry.parse(draft) if isinstance(draft, str) else None
    if name is not None and name.kind == registry.DEFAULT:
        draft = default_draft(target, name.lookup)
        name = registry.parse(draft)
    if name is not None and name.lookup is not None:
        inner, model, params = resolve_draft(registry.split_lookup(draft)[0], target, device,
                                             layout)
        # Trainium's compiler takes no `cond`: there the fallback proposes every iteration
        skip = devices.platform(device) != devices.NEURON
        return (registry.lookup_first(inner, name.lookup, target, skip_fallback=skip), model,
                params)
    if name is not None and name.kind == registry.MODEL:
        names.check_exists(draft, "draft")
        if head_store.is_head_dir(draft):  # on one CPU device: laid out (mapped) as it loads
            if devices.platform(device) == "cpu" and getattr(target, "mesh", None) is None:
                draft = head_store.load(draft, head_layout, device)
            else:
                draft = head_store.load(draft)
        else:
            from jaxspec.checkpoint.load import load_model
            from jaxspec.checkpoint.tokenizer import kind_of

            draft = load_model(draft, dtype=jnp.dtype(target.params["embed"].dtype).name,
                               device=device, tokenizer=kind_of(target.tokenizer))
    if isinstance(draft, head_store.LoadedHead):
        return head_store.as_draft(draft, target, head_layout)
    if isinstance(draft, Model):
        draft = placed(draft, device, layout)
    return (*registry.build(draft, target), None)


def default_draft(target, lookup: int | None = None) -> str | None:
    """The draft "default" (or "default+ngram:N") names for `target`: the draft head shipped
    for it with prompt lookup first (N, default 3; drafts.lookup_first), else none (or the
    n-gram draft alone)."""
    from jaxspec.checkpoint import head_store

    shipped = head_store.shipped_for(target)
    if shipped is None:
        return None if lookup is None else f"{registry.NGRAM}:{lookup}"
    return f"{shipped}+{registry.NGRAM}:{lookup or registry.NGRAM_DEFAULT}"


def placed(model, device, layout):
    """`model` with its params on `device` (None: where they are) in `layout`."""
    if device is None:
        if getattr(model, "mesh", None) is not None:
            return model  # sharded by load_model, in its layout
        params = layouts.apply(layout, model.params, model.config.tie_word_embeddings)
        return dataclasses.replace(model, params=params, layout=layout)
    from jaxspec.checkpoint.load import place

    return place(model, layout, device)


class SpeculativeDecoder:
    """Speculative decoding of `target` with `draft` (None or "none": plain decoding).

    Args:
      target: a model from `jaxspec.load_model`.
      draft: "default" (the trained draft head shipped in checkpoints/ when `target` is the
        model it was trained for, SmolLM2-135M-Instruct, with prompt lookup first; plain
        decoding otherwise), a draft head checkpoint (jaxspec.checkpoint.head_store), a model
        sharing the target's tokenizer, a path or model name of one, "layerskip:K" (the
        target's first K layers as its own draft), "ngram[:N]" (prompt lookup), any of these
        but none and ngram followed by "+ngram[:N]" (prompt lookup first, that draft where
        the row's last tokens did not occur before: jaxspec.drafts.lookup_first), an object
        implementing jaxspec.drafts.base.Draft, or None.
      draft_params: the params pytree of a Draft object that has weights; loaded and named
        drafts bring their own.
      num_speculative_tokens: γ, drafts per iteration (1..32; ignored without a draft), None
        (a loaded draft head's recorded γ for one prompt, and for a batch γ chosen by
        measurement up to it, as "auto"; else 4), or "auto": chosen by measurement
        (jaxspec.tuning) at the first generate call of each batch size, possibly 0 (plain
        decoding) when no γ is predicted to pay; cached per model pair, device and batch
        size (rounded up to a power of two). `gamma` and `gamma_choice` say what the last
        call used.
      mode: "dynamic" (one while loop), "chunked" (the same loop, the host calling it again
        after at most `static_iterations` iterations: streaming) or "static" (exactly
        `static_iterations` iterations per call; Trainium); None: static on Trainium
        ("neuron", which runs only "static"), dynamic elsewhere.
      static_iterations: iterations per call in static mode, at most per call in chunked.
      prng_impl: PRNG implementation for `jax.random.key`; None: "rbg" on Trainium, JAX's
        default elsewhere.
      device: where params live and programs run: None (JAX's default backend, the params
        where they are), "auto" (neuron, else gpu, else cpu), "cpu", "gpu", "neuron" or a
        jax.Device (jaxspec.devices). A device's platform picks the layout policy (the models'
        params are placed there in it) and the rejection kernel (the NKI one on "neuron").
      tp, dp: tensor and data parallelism over tp × dp devices of that platform
        (models.sharding): params split along key/value heads, MLP columns and vocabulary,
        the batch's rows over dp (the number of prompts must be a multiple of dp). A target
        loaded with load_model(tp=, dp=) brings its mesh.
    """

    def __init__(self, target, draft=registry.DEFAULT, *,
                 num_speculative_tokens: int | str | None = None,
                 mode: str | None = None, static_iterations: int = 8,
                 prng_impl: str | None = None, draft_params=None, device=None, tp: int = 1,
                 dp: int = 1):
        validation.check_decoder(num_speculative_tokens, mode, static_iterations, prng_impl, tp,
                                 dp)
        if not isinstance(target, Model):
            raise UserError(f"target must be a model from jaxspec.load_model, got "
                            f"{validation.show(target)}")
        self.device = devices.resolve(device)
        platform = devices.platform(self.device)
        mode, prng_impl = devices.loop_defaults(platform, mode, prng_impl)
        compile_cache.enable()
        self.mesh = getattr(target, "mesh", None) or sharding.mesh_for(
            target.config, tp=tp, dp=dp, platform=platform)
        layout = (layouts.for_platform(platform) if self.device is not None
                  else getattr(target, "layout", None) or layouts.default())
        self.layout = layouts.for_mesh(layout) if self.mesh is not None else layout
        target = placed(target, self.device, self.layout)
        if self.mesh is not None:  # before drafts: layerskip shares the sharded arrays
            target = sharding.shard_model(target, self.mesh)
        self.target = target
        if draft_params is not None and not isinstance(draft, Draft):
            raise UserError("draft_params is only for a Draft object (named, loaded and head "
                            "drafts bring their own params)")
        self.draft, self.draft_model, head_params = resolve_draft(draft, target, self.device,
                                                                  self.layout)
        if self.mesh is not None and self.draft_model is not None:
            self.draft_model = sharding.shard_model(self.draft_model, self.mesh)
        # γ for a batch of B prompts: the requested one, or "auto" (measured per B, up to
        # _auto_limit); a loaded head's recorded γ is its measured choice for one prompt, and
        # batches choose by measurement up to it (a verify of B rows costs more on a CPU)
        self._auto_limit, self._head_gamma = tuning.MAX_AUTO_GAMMA, False
        if head_params is not None:
            draft_params = head_params
            if num_speculative_tokens is None:
                num_speculative_tokens = self._auto_limit = self.draft.gamma
                self._head_gamma = True
        self.draft_params = (self.draft_model.params if self.draft_model is not None
                             else devices.put(draft_params, self.device))
        if num_speculative_tokens is None:
            num_speculative_tokens = DEFAULT_GAMMA
        self.platform = platform
        self.rejection = kernels.for_platform(platform)
        self._requested = num_speculative_tokens
        self._speculative = (self.draft, self.draft_model, self.draft_params)
        self._choices: dict[int, tuning.Choice] = {}  # by tuning.batch_bucket
        self.gamma = num_speculative_tokens if self.draft is not None else 0
        self.gamma_choice: tuning.Choice | None = None  # set when γ was measured (the last call)
        # the γ cache's name for the draft: what it resolved to, so that a name whose
        # meaning changes ("default") is profiled again
        self._draft_name = (draft if isinstance(draft, str) else "") + repr(self.draft)
        self.mode, self.static_iterations, self.prng_impl = mode, static_iterations, prng_impl
        self._compiled: dict = {}

    @property
    def draft_cost_source(self):
        """What a step timer measures for this decoder's draft cost (jaxspec.bench, tuning):
        the draft model, (HeadDraft, params) for a draft head, None for a model-free draft."""
        draft, draft_model, draft_params = self._speculative
        if isinstance(draft, LookupFirst):  # the lookup costs no forward pass
            draft = draft.fallback
        if isinstance(draft, HeadDraft):
            return draft, draft_params
        return draft_model

    def _resolve_gamma(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """Set γ (and the draft: none when γ is 0) for a call on these prompts."""
        draft, draft_model, draft_params = self._speculative
        if draft is None:
            return
        batch = tuning.batch_bucket(len(prompts))
        if self._requested == "auto" or (self._head_gamma and batch > 1):
            if batch not in self._choices:
                self._choices[batch] = self._choose_gamma(prompts[0], max_new_tokens, batch)
            self.gamma_choice = self._choices[batch]
            self.gamma = self.gamma_choice.gamma
        else:
            self.gamma_choice, self.gamma = None, self._requested
        speculating = self.gamma > 0  # 0: speculation is not predicted to pay, plain decoding
        self.draft, self.draft_model, self.draft_params = (
            (draft, draft_model, draft_params) if speculating else (None, None, None))

    def _choose_gamma(self, prompt: Sequence[int], max_new_tokens: int,
                      batch: int) -> tuning.Choice:
        """γ for batches of (bucketed) size `batch`: from the cache, or by profiling on `prompt`
        (jaxspec.tuning)."""
        key = tuning.cache_key(self.target, self._draft_name, self.platform, batch,
                               self._auto_limit)
        choice = tuning.load_cached(key)
        if choice is None:
            draft, draft_model, draft_params = self._speculative
            if draft_model is not None:
                draft, draft_params = draft_model, None

            def run(gamma):
                decoder = SpeculativeDecoder(self.target, draft, num_speculative_tokens=gamma,
                                             draft_params=draft_params, device=self.device,
                                             prng_impl=self.prng_impl)
                new = min(tuning.PROFILE_TOKENS, max_new_tokens)
                return decoder.generate([prompt], max_new_tokens=new).stats["rows"][0]

            choice = tuning.profile(self.target, self.draft_cost_source, run,
                                    prompt_length=len(prompt), max_new_tokens=max_new_tokens,
                                    max_gamma=self._auto_limit, batch=batch)
            tuning.store(key, choice)
        return choice

    def _check(self, prompts, max_new_tokens, temperature, top_k=0, top_p=1.0, seed=0,
               on_update=None) -> tuple[list[list[int]], int | list[int]]:
        """Validate generate's arguments (jaxspec.validation); resolve γ "auto"; check that the
        positions fit the models. Returns (prompts as lists of ints, seed)."""
        prompts = validation.check_prompts(prompts, self.target.config.vocab_size)
        max_new_tokens = validation.check_max_new_tokens(max_new_tokens)
        validation.check_sampling(temperature, top_k, top_p)
        seed = validation.check_seed(seed, len(prompts))
        validation.check_callback("on_update", on_update)
        self._resolve_gamma(prompts, max_new_tokens)
        self._check_positions(prompts, max_new_tokens)
        return prompts, seed

    def _check_positions(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        longest = max(len(p) for p in prompts)
        need = longest + max_new_tokens + self.gamma + 1
        for name, m in (("target", self.target), ("draft", self.draft_model)):
            if m is not None and need > m.config.max_position_embeddings:
                extra = f" + {self.gamma} speculative + 1" if self.gamma else ""
                raise UserError(
                    f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}){extra} needs "
                    f"{need} positions; the {name} model has "
                    f"{m.config.max_position_embeddings}")

    def _compile(self, name: str, fn: Callable, spec: LoopSpec, *args, donate=()):
        """Start compiling fn(spec, *args) once per spec and argument shapes, or loading it as
        an earlier process compiled it (jaxspec.program_cache): a program_cache.Pending, whose
        XLA compile goes on in the background until its `result()` is asked for."""
        shapes = tuple(jax.tree.map(lambda a: (a.shape, a.dtype), jax.tree.leaves(args)))
        key = (name, spec, shapes)
        if key not in self._compiled:
            self._compiled[key] = program_cache.start(fn, spec, *args, donate=donate,
                                                      device=self.device)
        return self._compiled[key]

    def _loop_spec(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   sampler: sampling.Sampler) -> LoopSpec:
        longest = max(len(p) for p in prompts)
        return LoopSpec(
            target=self.target.config, draft=self.draft, gamma=self.gamma, sampler=sampler,
            max_len=loop_max_len(longest, max_new_tokens, self.gamma),
            dtype=self.target.params["embed"].dtype, layout=self.layout,
            rejection=self.rejection, mesh=self.mesh)

    def memory_plan(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, *,
                    temperature: float = 0.0) -> memory.Plan:
        """The bytes that generate(prompts, max_new_tokens=..., temperature=...) needs on the
        device, by term (jaxspec.memory), computed without allocating anything. With γ "auto",
        γ is chosen first (as generate would)."""
        prompts, _ = self._check(prompts, max_new_tokens, temperature)
        return self._plan(prompts, max_new_tokens, sampling.Sampler(greedy=temperature == 0))

    def _plan(self, prompts, max_new_tokens: int, sampler: sampling.Sampler) -> memory.Plan:
        spec = self._loop_spec(prompts, max_new_tokens, sampler)
        return memory.plan(spec, len(prompts), self.target.params, self.draft_params,
                           prompt_width(max(len(p) for p in prompts)))

    def memory_capacity(self) -> memory.Capacity | None:
        """What the decoder's device offers (jaxspec.memory.capacity; None: unknown); under a
        mesh, this process's first device's, shared by its devices where they share memory."""
        if self.mesh is not None:  # this process's devices (several processes: each its own)
            local = self.mesh.local_devices
            return memory.capacity(local[0], sharing=len(local))
        return memory.capacity(devices.or_default(self.device))

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | Sequence[int] = 0,
                 on_update: Callable[[list[list[int]]], None] | None = None) -> GenerateOutput:
        """Generate up to max_new_tokens new tokens after each prompt (a sequence of token
        ids; or all prompts as one 2-D integer array).

        Rows stop at an EOS id of the target (kept in the output) or at max_new_tokens.
        `seed`: one int for the batch (rows get distinct streams derived from it and their
        index), or one int in 0..2**32-1 per prompt: a row's sampled tokens then depend only on
        its prompt and seed, the same alone or in any batch.
        `on_update(tokens)` receives every row's new tokens so far, after each chunk (static
        and chunked modes; once at the end in dynamic mode): the CLI streams text with it.
        """
        prompts, seed = self._check(prompts, max_new_tokens, temperature, top_k, top_p, seed,
                                    on_update)
        sampler = sampling.Sampler(greedy=temperature == 0)  # enough for the memory plan
        if self.mesh is not None and len(prompts) % self.mesh.shape[sharding.DATA]:
            raise UserError(f"{len(prompts)} prompts do not split over dp="
                            f"{self.mesh.shape[sharding.DATA]}: give a multiple of dp")
        # refuse what does not fit before anything is compiled or allocated (jaxspec.memory:
        # bytes per device, one device's part under a mesh)
        memory.check(self._plan(prompts, max_new_tokens, sampler), self.memory_capacity())
        key = seed_key(seed, self.prng_impl)
        sampler, values = sampling.make(temperature, top_k, top_p)
        width = prompt_width(max(len(p) for p in prompts))
        prompt = np.zeros((len(prompts), width), np.int32)  # [B, P] right-padded
        for b, p in enumerate(prompts):
            prompt[b, : len(p)] = p
        spec = self._loop_spec(prompts, max_new_tokens, sampler)
        args = self._inputs(jnp.asarray(prompt), jnp.asarray([len(p) for p in prompts], jnp.int32),
                            key, values, jnp.int32(max_new_tokens))
        run = self._run_dynamic if self.mode == "dynamic" else self._run_chunks
        state, compile_seconds, wall = run(spec, args, on_update)
        draft_state = state.draft_state
        state = sharding.to_host(state.replace(target_cache=None, draft_state=None))
        stats = summarize(state, gamma=self.gamma, draft=self.draft, wall_seconds=wall,
                          compile_seconds=compile_seconds, draft_state=draft_state)
        if self.gamma_choice is not None:
            stats["gamma_choice"] = self.gamma_choice.as_stats()
        return GenerateOutput(tokens=new_tokens(state), stats=stats)

    def _inputs(self, prompt, prompt_lengths, key, values, max_new_tokens) -> tuple:
        """generate_tokens' arguments after spec, committed to the device (or, with a mesh:
        rows split over "data", the rest replicated)."""
        rest = (key, values, max_new_tokens)
        if self.mesh is None:
            return devices.put((self.target.params, self.draft_params, prompt, prompt_lengths,
                                *rest), self.device)
        rows, everywhere = sharding.rows(self.mesh), NamedSharding(self.mesh, PartitionSpec())
        if not everywhere.is_fully_addressable:  # a mesh over several processes (hosts)
            return (self.target.params, self.draft_params,
                    *sharding.put((prompt, prompt_lengths), rows), *rest)
        return (self.target.params, self.draft_params, *jax.device_put((prompt, prompt_lengths),
                                                                       rows),
                *jax.device_put(rest, everywhere))

    def _run_dynamic(self, spec, args, on_update):
        start = time.perf_counter()
        compiled = self._compile("dynamic", loop.generate_tokens, spec, *args).result()
        compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        state = jax.block_until_ready(compiled(*args))
        wall = time.perf_counter() - start
        if on_update is not None:
            on_update(new_tokens(state))
        return state, compile_seconds, wall

    def _run_chunks(self, spec, args, on_update):
        """Static or chunked mode: one program for the prefill, then one per chunk of at most
        `static_iterations` iterations, the host calling it again until every row is done."""
        target_params, draft_params, *_, values, _ = args
        chunked = self.mode == "chunked"
        start = time.perf_counter()
        init = self._compile(self.mode + " init", loop.init_chunks if chunked else
                             loop.init_state, spec, *args)  # compiles meanwhile
        chunk_fn = functools.partial(loop.run_chunk if chunked else loop.run_static,
                                     iterations=self.static_iterations)
        chunk = self._compile(self.mode, chunk_fn, spec, target_params, draft_params, values,
                              init.out_info, donate=(4,))
        init, chunk = init.result(), chunk.result()
        compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        carry = init(*args)
        lengths = None
        while True:
            state = carry[0] if chunked else carry  # chunked: (state, proposal)
            done, now, rows = _snapshot(state, rows=on_update is not None)
            finished = bool(np.all(done))
            if not finished:  # dispatched first: the chunk runs while the rows are handled
                lengths = _progressed(lengths, now)
                carry = chunk(target_params, draft_params, values, carry)
            if on_update is not None:
                on_update(rows)
            if finished:
                return state, compile_seconds, time.perf_counter() - start


def _snapshot(state: DecodeState, rows: bool):
    """(done bool[B], lengths i32[B], `new_tokens` or None) of a state, copied to the host out
    of its buffers (the next chunk donates them)."""
    done, lengths = sharding.to_host((state.done, state.lengths))
    return np.array(done), np.array(lengths), new_tokens(state) if rows else None


def _progressed(before: np.ndarray | None, lengths: np.ndarray) -> np.ndarray:
    """`lengths` (i32[B], before a chunk) after checking that the previous chunk made
    progress: every iteration adds a token to each unfinished row, so a chunk that adds none
    to any row would repeat forever."""
    if before is not None and np.array_equal(before, lengths):
        raise RuntimeError("a chunk generated no token in any unfinished row; "
                           "stopping instead of looping forever (a bug: please report it)")
    return lengths


def new_tokens(state: DecodeState) -> list[list[int]]:
    """Each row's generated tokens, from the buffer of a (possibly unfinished) state."""
    state = sharding.to_host(state.replace(target_cache=None, draft_state=None))
    tokens = np.asarray(state.tokens)
    lengths, starts = np.asarray(state.lengths), np.asarray(state.prompt_lengths)
    return [tokens[b, starts[b]: lengths[b]].tolist() for b in range(len(lengths))]


def seed_key(seed: int | list[int], prng_impl: str | None = None) -> jax.Array:
    """generate's checked `seed` as the loop's key: a PRNG key for one int, u32[B] for one per
    row (jaxspec.validation.check_seed)."""
    if isinstance(seed, int):
        return jax.random.key(seed, impl=prng_impl)
    return jnp.asarray(np.asarray(seed, np.uint32))
