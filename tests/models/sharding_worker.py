"""Run by test_sharding.py in a process with 8 CPU devices: generate on several meshes and
print the tokens and the shardings found, as JSON."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from helpers import perturbed, tiny_model

import jaxspec
from jaxspec.decode import sampling
from jaxspec.drafts.model_draft import ModelDraft
from jaxspec.drafts.ngram import NgramDraft
from jaxspec.errors import UserError
from jaxspec.models import sharding

PROMPTS = [[5, 17, 3, 9], [40, 2], [7, 7, 7, 1, 2], [12, 44, 30]]  # B = 4
MESHES = {"single": None, "tp2": (2, 1), "tp4": (4, 1), "dp2_tp2": (2, 2)}


def run(target, draft, draft_kind, mesh, temperature):
    sampler, values = sampling.make(temperature)
    draft_obj = {"none": None, "model": ModelDraft(draft.config, target.config.vocab_size),
                 "ngram": NgramDraft(3, target.config.vocab_size)}[draft_kind]
    gamma = 0 if draft_obj is None else 3
    spec = jaxspec.LoopSpec(target=target.config, draft=draft_obj, gamma=gamma,
                            sampler=sampler, max_len=64, mesh=mesh)
    target_params, draft_params = target.params, draft.params if draft_kind == "model" else None
    prompt = np.zeros((len(PROMPTS), 8), np.int32)
    for b, p in enumerate(PROMPTS):
        prompt[b, : len(p)] = p
    prompt, lengths = jnp.asarray(prompt), jnp.asarray([len(p) for p in PROMPTS], jnp.int32)
    if mesh is not None:
        target_params = sharding.shard_params(target_params, mesh)
        if draft_params is not None:
            draft_params = sharding.shard_params(draft_params, mesh)
        prompt, lengths = (jax.device_put(x, sharding.rows(mesh)) for x in (prompt, lengths))
    state = jax.jit(jaxspec.generate_tokens, static_argnums=0)(
        spec, target_params, draft_params, prompt, lengths, jax.random.key(3), values,
        jnp.int32(16))
    tokens = np.asarray(state.tokens)
    new = [tokens[b, len(p): int(state.lengths[b])].tolist() for b, p in enumerate(PROMPTS)]
    arrays = {"cache": state.target_cache.k, "values": state.target_cache.v,
              "tokens": state.tokens, "wqkv": target_params["layers"][0]["wqkv"],
              "embed": target_params["embed"], "norm": target_params["final_norm"]}
    return new, {name: _spec(a) if mesh else None for name, a in arrays.items()}


def _spec(array) -> list:
    """The array's PartitionSpec as a list, trailing unsplit axes dropped."""
    spec = list(array.sharding.spec)
    while spec and spec[-1] is None:
        spec.pop()
    return spec


def through_the_api(directory: str) -> dict:
    """load_model(tp=2) restores a converted checkpoint shard by shard; SpeculativeDecoder
    takes its mesh (and tp/dp itself); tokens as on one device."""
    from helpers import tiny_hf_model

    from jaxspec.checkpoint import convert

    path = convert(tiny_hf_model("qwen2", directory), f"{directory}/converted")
    prompts = [[5, 6, 7, 5, 6], [9, 1, 2, 3]]
    single = jaxspec.load_model(path)
    sharded = jaxspec.load_model(path, tp=2)
    out = {"restored": {name: _spec(a) for name, a in (
        ("embed", sharded.params["embed"]), ("wqkv", sharded.params["layers"][0]["wqkv"]),
        ("w_down", sharded.params["layers"][1]["w_down"]))}}
    for name, model, kwargs in (("single", single, {}), ("loaded_tp2", sharded, {}),
                                ("decoder_tp2_dp2", single, dict(tp=2, dp=2))):
        dec = jaxspec.SpeculativeDecoder(model, "layerskip:1", num_speculative_tokens=2,
                                         **kwargs)
        out[name] = dec.generate(prompts, max_new_tokens=10, temperature=0.7, seed=5).tokens
    try:
        dec.generate([[5, 10**6], [1, 2]], max_new_tokens=4)
    except UserError as e:
        out["bad_token_error"] = str(e)
    out["plan"] = memory_plan(dec, prompts)
    return out


def memory_plan(dec, prompts) -> dict:
    """The tp=2 × dp=2 decoder's plan next to one device's part of what it allocates."""
    from jaxspec.models.cache import init_cache

    plan = dec.memory_plan(prompts, 10, temperature=0.7)
    spec = dec._loop_spec(prompts, 10, sampling.Sampler(greedy=False))
    cache = jax.jit(lambda: init_cache(spec.target, len(prompts), spec.max_len, spec.dtype,
                                       spec.layout), out_shardings=sharding.cache(dec.mesh))()

    def one_device(tree):
        return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))

    whole = sum(leaf.nbytes for leaf in jax.tree.leaves(dec.target.params))
    return {"target_params": [plan.target_params, one_device(dec.target.params), whole],
            "target_cache": [plan.target_cache, one_device(cache)],
            "token_buffer": [plan.token_buffer, len(prompts) // 2 * spec.max_len * 4],
            "activations": [plan.activations, (3 + 2 + 3) * (dec.target.config.vocab_size // 2)
                            * 4],  # 1 row: logits and p [1, γ + 1, V / 2], q [1, γ, V / 2]
            "capacity_shared_by": dec.memory_capacity().shared_by}


def main():
    target = tiny_model(0, std=0.5, vocab=48, hidden=64, heads=8, kv_heads=4, intermediate=128)
    draft = perturbed(target, noise=0.02)
    out = {"api": through_the_api(sys.argv[1])}
    for name, shape in MESHES.items():
        mesh = None if shape is None else sharding.make_mesh(*shape)
        for kind in ("none", "model", "ngram"):
            for temperature in (0.0, 0.8):
                key = f"{name}/{kind}/{temperature}"
                out[key] = run(target, draft, kind, mesh, temperature)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
