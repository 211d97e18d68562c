"""An EAGLE-3-style draft head: one decoder layer fed by the target's own hidden states.

Entry p of the head (its KV cache slot p) reads a feature f_p and the embedding of token
x_{p+1}; its output o_p predicts x_{p+2}. For the first draft of an iteration f_p is the
target's: the residual streams entering `hidden_layers` at position p, fused by one linear
layer ([C·D] -> D). Later drafts feed the head's own output: f_{p+1} = o_p (EAGLE-3's
"training-time test" trains exactly this chain, jaxspec.training.objective).

    x   = [rms_norm(embed[x_{p+1}]), rms_norm(f_p)]            [2D]
    h   = f_p + attention(x)                                   one layer, its own KV cache
    o_p = h + mlp(rms_norm(h))                                 [D]
    logits = rms_norm(o_p) @ lm_head                           [V_d], the draft vocabulary

The embedding is the target's (frozen, shared: the loop's draft params are
{"head": head params, "embed": the target's embed array}, no copy). The head's own output layer
covers V_d ≪ V tokens, `d2t` [V_d] maps them to target ids; q over the target vocabulary is zero
outside them, so rejection sampling stays exact at every temperature.

Head params: {"fuse": [C·D, D], "embed_norm": [D], "feature_norm": [D],
              "layers": [{"wqkv": [2D, K, G + 2, Dh], "wo", "mlp_norm", "w_gate_up",
                          "w_down"}]  (one layer, shapes as models.decoder's),
              "final_norm": [D], "lm_head": [D, V_d], "d2t": [V_d] int32}
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxspec import pytree
from jaxspec.decode.sampling import first_argmax, probabilities, sample
from jaxspec.drafts.base import Draft, confident, decline_unsure
from jaxspec.models import decoder
from jaxspec.models import layout as layouts
from jaxspec.models.cache import KVCache, init_cache
from jaxspec.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    target: ModelConfig  # the target the head was made for (its shapes; hashable)
    hidden_layers: tuple[int, ...]  # target layers whose input stream is fused (0..L)
    draft_vocab: int  # V_d

    @property
    def layer(self) -> ModelConfig:
        """The config of the head's decoder layer (plain Llama attention, no window)."""
        return dataclasses.replace(self.target, num_layers=1, vocab_size=self.draft_vocab,
                                   attention_bias=False, qk_norm=False, sliding_window=None)

    def to_dict(self) -> dict:
        return {"target": self.target.to_dict(), "hidden_layers": list(self.hidden_layers),
                "draft_vocab": self.draft_vocab}

    @classmethod
    def from_dict(cls, d: dict) -> HeadConfig:
        return cls(ModelConfig.from_dict(d["target"]), tuple(int(i) for i in d["hidden_layers"]),
                   int(d["draft_vocab"]))


def default_layers(num_layers: int) -> tuple[int, ...]:
    """An early, a middle and the last residual stream (fewer when the target is tiny)."""
    return tuple(sorted({1 + num_layers // 10, num_layers // 2, num_layers} - {0}))


def init_params(config: HeadConfig, key: jax.Array, target_params=None, d2t=None,
                dtype=jnp.float32) -> dict:
    """Fresh head params. With the target's params and d2t, the output layer starts as the
    target's own rows for the draft vocabulary and the fusion as the identity on the last
    fused stream (the head starts out as a copy of the target's output layer)."""
    lc = config.layer
    D, F, Dh, C = lc.hidden_size, lc.intermediate_size, lc.head_dim, len(config.hidden_layers)
    keys = iter(jax.random.split(key, 6))

    def dense(shape):
        return (jax.random.normal(next(keys), shape) * 0.02).astype(dtype)

    ones = jnp.ones((D,), dtype)
    d2t = jnp.arange(config.draft_vocab, dtype=jnp.int32) if d2t is None else jnp.asarray(d2t)
    params = {
        "fuse": dense((C * D, D)), "embed_norm": ones, "feature_norm": ones,
        "layers": [{"wqkv": dense((2 * D, lc.num_kv_heads, lc.num_groups + 2, Dh)),
                    "wo": dense((lc.num_heads * Dh, D)), "mlp_norm": ones,
                    "w_gate_up": dense((D, 2, F)), "w_down": dense((F, D))}],
        "final_norm": ones, "lm_head": dense((D, config.draft_vocab)), "d2t": d2t.astype(jnp.int32),
    }
    if target_params is not None:
        out = target_params.get("lm_head")
        out = layouts.unpack(out) if isinstance(out, layouts.Panels) else out
        rows = out[:, d2t] if out is not None else target_params["embed"][d2t].T
        params["lm_head"] = jnp.asarray(rows, dtype)
        params["final_norm"] = jnp.asarray(target_params["final_norm"], dtype)
        params["fuse"] = params["fuse"].at[(C - 1) * D:].add(jnp.eye(D, dtype=dtype))
    return params


def fuse(head: dict, captured: jax.Array) -> jax.Array:
    """captured[..., C, D] (the target's streams) -> features [..., D] in the head's dtype."""
    flat = captured.reshape(captured.shape[:-2] + (-1,)).astype(head["embed_norm"].dtype)
    return decoder.dense(flat, head["fuse"])


def layer_inputs(config: HeadConfig, head: dict, embed, tokens, features):
    """tokens[B, T], features[B, T, D] -> the attention input [B, T, 2D]."""
    eps = config.target.rms_norm_eps
    e = embed[jnp.clip(tokens, 0, embed.shape[0] - 1)].astype(features.dtype)
    return jnp.concatenate([decoder.rms_norm(e, head["embed_norm"], eps),
                            decoder.rms_norm(features, head["feature_norm"], eps)], axis=-1)


def layer_output(config: HeadConfig, head: dict, features, attended):
    """The residual and MLP after attention: o [B, T, D]."""
    layer = head["layers"][0]
    h = features + attended
    norm = decoder.rms_norm(h, layer["mlp_norm"], config.target.rms_norm_eps)
    return h + decoder.mlp(config.layer, layer, norm)


def head_logits(config: HeadConfig, head: dict, out) -> jax.Array:
    """o[..., D] -> logits [..., V_d] (fp32) over the draft vocabulary."""
    normed = decoder.rms_norm(out, head["final_norm"], config.target.rms_norm_eps)
    return decoder.logits({"lm_head": head["lm_head"]}, normed)


def run_layer(config: HeadConfig, head: dict, embed, tokens, features, positions,
              cache: KVCache):
    """Entries at positions[B, T]: tokens[B, T], features[B, T, D] -> (o [B, T, D], cache)."""
    lc = config.layer
    x = layer_inputs(config, head, embed, tokens, features)
    mask = decoder.attention_mask(lc, positions, cache.max_len)
    rope_cs = decoder.rope_tables(positions, decoder.inv_frequencies(lc), x.dtype)
    attended, cache = decoder.attention(lc, head["layers"][0], x, positions, mask, rope_cs,
                                        cache, 0)
    return layer_output(config, head, features, attended), cache


@pytree.dataclass
class HeadState:
    cache: KVCache  # the head's one-layer cache
    feature: jax.Array  # [B, D] the target's fused feature at lengths - 2 (propose's start)


@dataclasses.dataclass(frozen=True)
class HeadDraft(Draft):
    """The head as a loop draft. Params: {"head": head params, "embed": the target's embed}.

    Each iteration: `propose` runs γ one-position entries (the first with the target's feature
    at lengths - 2, the rest chained on the head's own output) on a scratch copy of the cache;
    `observe` runs entry lengths - 2 and the γ + 1 verified entries with the target's
    features, so the cache holds target-fed entries for every committed position.
    threshold > 0: a row stops proposing at its first position where the head's top
    probability is below it (output never depends on it).
    """

    config: HeadConfig
    threshold: float = 0.0
    gamma: int = 4  # the γ measured best for this head (the API's default; the loop's is its own)

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        return self.config.hidden_layers

    @property
    def declines(self) -> bool:
        return self.threshold > 0

    def init_state(self, batch: int, max_len: int, dtype, layout) -> HeadState:
        """The head runs in fp32 whatever the target's dtype (its params are loaded in fp32)."""
        cache = init_cache(self.config.layer, batch, max_len, jnp.float32, layout)
        return HeadState(cache, jnp.zeros((batch, self.config.target.hidden_size), jnp.float32))

    def prefill(self, params, state: HeadState, prompt, prompt_lengths, hidden) -> HeadState:
        head = params["head"]
        features = fuse(head, hidden)  # [B, P, D]
        following = jnp.pad(prompt[:, 1:], ((0, 0), (0, 1)))  # x_{p+1} (pad past the end)
        positions = jnp.broadcast_to(jnp.arange(prompt.shape[1]), prompt.shape)
        _, cache = run_layer(self.config, head, params["embed"], following, features, positions,
                             state.cache)
        rows = jnp.arange(prompt.shape[0])
        return HeadState(cache, features[rows, prompt_lengths - 1])

    def observe(self, params, state: HeadState, observation) -> HeadState:
        """Run the γ + 1 verified entries with the target's features, and the entry before
        them again (lengths - 2: its token was not known at prefill, and `propose` keeps none
        of its own writes), so the cache holds target-fed entries for every committed
        position whether or not `propose` ran."""
        head = params["head"]
        features = jnp.concatenate([state.feature[:, None], fuse(head, observation.hidden)],
                                   axis=1)  # [B, γ+2, D]
        tokens = jnp.concatenate([observation.tokens[:, :1], observation.emitted], axis=1)
        positions = jnp.concatenate([observation.positions[:, :1] - 1, observation.positions],
                                    axis=1)
        _, cache = run_layer(self.config, head, params["embed"], tokens, features, positions,
                             state.cache)
        rows = jnp.arange(features.shape[0])
        return HeadState(cache, features[rows, observation.n_accepted + 1])

    def forward_calls(self, gamma: int, iterations: int, state=None) -> int:
        return 1 + (gamma + 1) * iterations  # γ proposing entries and one observe per iteration

    @staticmethod
    def observed_entries(gamma: int) -> int:
        """Entries one `observe` runs: lengths - 2 and the γ + 1 verified ones."""
        return gamma + 2

    # `propose` returns the state it was given: an iteration may leave it out (LookupFirst)
    proposals_keep_state = True

    def propose(self, params, state: HeadState, tokens, lengths, *, gamma: int, sampler, values,
                uniforms):
        """γ drafts per row: (draft_tokens [B, γ], q [B, γ, V] or None, state). The entries
        run here are scratch: the state returned is the one given (`observe` writes)."""
        head, embed, d2t = params["head"], params["embed"], params["head"]["d2t"]
        rows = jnp.arange(tokens.shape[0])
        vocab = self.config.target.vocab_size

        def step(carry, u):
            cache, feature, token, position = carry  # [B, D], [B], [B]
            out, cache = run_layer(self.config, head, embed, token[:, None], feature[:, None],
                                   position[:, None], cache)
            logits = head_logits(self.config, head, out[:, 0])  # [B, V_d]
            sure = confident(logits, self.threshold) if self.declines else None
            if sampler.greedy:
                q, drafted = None, d2t[first_argmax(logits)]
            else:
                full = jnp.full((logits.shape[0], vocab), -jnp.inf).at[:, d2t].set(logits)
                q = probabilities(sampler, values, full)  # [B, V], zero outside d2t
                drafted = sample(q, u)
            return (cache, out[:, 0], drafted, position + 1), (drafted, q, sure)

        start = (state.cache, state.feature, tokens[rows, lengths - 1], lengths - 2)
        _, (drafted, qs, sures) = jax.lax.scan(step, start, uniforms[:, :gamma].T)
        draft_tokens = drafted.T  # [B, γ]
        if self.declines:
            draft_tokens = decline_unsure(draft_tokens, sures.T)
        q = None if sampler.greedy else qs.transpose(1, 0, 2)
        return draft_tokens, q, state
