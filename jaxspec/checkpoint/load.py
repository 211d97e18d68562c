"""`load_model`: a jaxspec checkpoint directory, a Hugging Face directory, a GGUF file or a
model name -> a `Model` whose params are laid out for the backend they will run on."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os

import jax

from jaxspec import compile_cache, devices, validation
from jaxspec.checkpoint import blocks, default_model, keymap, mapped, names, store
from jaxspec.checkpoint.conversion import open_source, source_kind
from jaxspec.checkpoint.tokenizer import load_tokenizer, tokenizer_from_files
from jaxspec.errors import UserError
from jaxspec.models import layout as layouts
from jaxspec.models import sharding
from jaxspec.models.loaded import Model


def _load_converted(path: str, dtype: str, mesh_of, repair: bool = True,
                    stored: dict | None = None) -> Model:
    """A jaxspec checkpoint directory, without its tokenizer (load_model loads it meanwhile),
    with its quantized blocks in place of those weights when `stored` (their abstract) is
    given; the default model's is converted again (once) when its params or blocks cannot be
    restored (default_model.convert_again)."""
    config, version = store.read_meta(path)
    mesh = mesh_of(config)
    try:
        params = store.restore_params(path, config, version, dtype, mesh)
        if stored:
            params = blocks.substitute(params, blocks.restore(path, stored))
    except UserError as e:
        if not (repair and path == os.path.abspath(default_model.converted_dir())):
            raise
        default_model.convert_again(str(e))
        return _load_converted(path, dtype, mesh_of, repair=False, stored=stored)
    return Model(config=config, params=params, path=path, mesh=mesh)


def _load_mapped(path: str, dtype: str, layout: layouts.Layout, device) -> Model:
    """A converted checkpoint on one CPU device, its params laid out by
    jaxspec.checkpoint.mapped (mapped when an earlier process saved them), with its quantized
    blocks in place of those weights where the layout reads blocks (jaxspec.checkpoint.blocks)."""
    config, _ = store.read_meta(path)
    stored = blocks.abstract(path)
    stored = stored if stored and blocks.wanted(layout, dtype) else None

    def abstract():
        params = store.abstract_params(config, dtype)
        params = blocks.substitute(params, stored) if stored else params
        return jax.eval_shape(lambda p: layouts.apply(layout, p, config.tie_word_embeddings),
                              params)

    def restore():
        return place(_load_converted(path, dtype, lambda config: None, stored=stored), layout,
                     device).params

    params = mapped.laid_out(path, dtype, layout, abstract, restore, device)
    return Model(config=config, params=params, path=path, layout=layout)


def _load_in_memory(path: str, dtype: str, mesh_of, tokenizer_kind: str, layout) -> Model:
    """A Hugging Face directory or GGUF file converted in memory (a GGUF file's quantized
    blocks kept where the layout reads blocks)."""
    np_dtype = store.numpy_dtype(dtype)
    with open_source(path) as source:
        mesh = mesh_of(source.config)
        params = keymap.build_params(source.config, source.get, np_dtype)
        if source.blocks is not None and mesh is None and blocks.wanted(layout, dtype):
            params = blocks.substitute(params, blocks.build(source.config, source.blocks, params))
        tokenizer = tokenizer_from_files(source.tokenizer_files, tokenizer_kind)
    return Model(config=source.config, params=params, tokenizer=tokenizer, path=path, mesh=mesh)


def load_model(source: str, *, dtype: str = "float32", device=None, tp: int = 1,
               dp: int = 1, tokenizer: str = "transformers") -> Model:
    """Load a model from a jaxspec checkpoint dir, a Hugging Face dir, a .gguf file or a name.

    The only name is "smollm2-135m-instruct" (downloaded and converted once into the cache).
    Hugging Face and GGUF sources are converted in memory, nothing is written.
    dtype: "float32" or "bfloat16" (the params' dtype after loading).
    device: None (JAX's default device), "auto", "cpu", "gpu", "neuron" or a jax.Device (see
    jaxspec.devices; a platform JAX does not see raises UserError before anything is read).
    The params are placed on that device, in the layout that the layout policy picks for its
    platform; on one CPU device, a converted checkpoint's laid-out params are saved once and
    mapped by later loads (jaxspec.checkpoint.mapped). tp, dp > 1: split over a tp × dp mesh
    of that platform's devices instead (models.sharding); a converted checkpoint is restored
    shard by shard, each onto its device, without gathering the whole model on one.
    tokenizer: "transformers" (`Model.tokenizer` is a transformers PreTrainedTokenizerFast) or
    "light" (a jaxspec.checkpoint.light_tokenizer.LightTokenizer: the same ids, text and chat
    template without importing transformers; the CLI's).
    """
    source = validation.check_source("source", source)
    validation.one_of("dtype", dtype, tuple(store.DTYPES))
    validation.check_parallel(tp, dp)
    validation.one_of("tokenizer", tokenizer, ("transformers", "light"))
    device = devices.resolve(device)
    compile_cache.enable()  # before anything here compiles (see jaxspec.compile_cache)
    names.check_exists(source)
    if not os.path.exists(source):
        source = default_model.ensure_converted()
    path = os.path.abspath(source)
    converted = source_kind(path) == "jaxspec"
    platform = devices.platform(device)
    layout = layouts.for_platform(platform)

    def mesh_of(config):
        return sharding.mesh_for(config, tp=tp, dp=dp, platform=platform)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # a converted checkpoint's tokenizer (with transformers: mostly importing it) loads
        # in a thread while the params are read and laid out (tensorstore's and XLA's threads)
        loading = pool.submit(load_tokenizer, path, tokenizer) if converted else None
        if converted and platform == "cpu" and tp == dp == 1:
            model = _load_mapped(path, dtype, layout, device)
        elif converted:
            model = place(_load_converted(path, dtype, mesh_of), layout, device)
        else:
            model = place(_load_in_memory(path, dtype, mesh_of, tokenizer, layout), layout,
                          device)
        if loading is not None:
            model = dataclasses.replace(model, tokenizer=loading.result())
    return model


def place(model: Model, layout: layouts.Layout, device=None) -> Model:
    """The model with its params on `device` (a jax.Device; None: the default device), or on
    its mesh when it has one, laid out by `layout` (one copy)."""
    if model.mesh is not None:
        layout = layouts.for_mesh(layout)
        params = sharding.shard_params(model.params, model.mesh)
    else:
        params = jax.device_put(model.params, device)
    params = layouts.apply(layout, params, model.config.tie_word_embeddings)
    return dataclasses.replace(model, params=params, layout=layout)
