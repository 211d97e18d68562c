"""On-policy training data: the target decodes prompts in batches (greedy) and records, at every
position it processes, the residual streams the head fuses and its own top logits. No second
pass: the prefill gives the prompt's positions, each decode step the next one.

A `Records` holds N rows of W positions each (a row is one prompt and its continuation, cut
after the first EOS, right-padded):

    tokens   [N, W] int32     the input token at each position
    hidden   [N, W, C, D]     bf16, the streams entering the head's hidden_layers there
    top_ids  [N, W, k] int32  the target's k most likely next tokens there,
    top_logp [N, W, k] fp32   and their log-probabilities (full softmax)
    lengths  [N]              valid positions per row
    prompt_lengths [N]        the prompt's positions; the rest the target generated
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm import tqdm

from jaxspec import xla_options
from jaxspec.decode.sampling import first_argmax
from jaxspec.models import decoder
from jaxspec.models.cache import bucket, init_cache
from jaxspec.models.layout import default


@dataclasses.dataclass
class Records:
    tokens: np.ndarray
    hidden: np.ndarray
    top_ids: np.ndarray
    top_logp: np.ndarray
    lengths: np.ndarray
    prompt_lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def take(self, rows) -> Records:
        return Records(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))

    def save(self, path: str) -> None:
        """One .npz file (bf16 hidden states stored as their uint16 bits), written atomically."""
        arrays = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        arrays["hidden"] = arrays["hidden"].view(np.uint16)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @staticmethod
    def load(path: str) -> Records:
        """Records from `save`."""
        with np.load(path) as f:
            arrays = {name: f[name] for name in f.files}
        arrays["hidden"] = arrays["hidden"].view(ml_dtypes.bfloat16)
        return Records(**arrays)

    @staticmethod
    def concatenate(parts) -> Records:
        return Records(*(np.concatenate([getattr(p, f.name) for p in parts])
                         for f in dataclasses.fields(Records)))


def _top(logits, k: int):
    """logits [..., V] -> (ids [..., k], log-probabilities [..., k])."""
    values, ids = jax.lax.top_k(logits, k)
    return ids, values - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


@functools.partial(xla_options.jit, static_argnames=("config", "layers", "steps", "k", "layout"))
def _generate(config, params, prompt, prompt_lengths, *, layers, steps: int, k: int, layout):
    """Prefill prompt[B, P] and decode `steps` greedy tokens, recording every position.

    Returns prompt-position records [B, P, ...] and step records [steps, B, ...] (step s is
    position prompt_lengths + s)."""
    B, P = prompt.shape
    rows = jnp.arange(B)
    cache = init_cache(config, B, bucket(P + steps), params["embed"].dtype, layout)
    positions = jnp.broadcast_to(jnp.arange(P), (B, P))
    hidden, captured, cache = decoder.run_layers(config, params, prompt, positions, cache, layers,
                                                 prefill=True)
    logits = decoder.logits(params, hidden)  # [B, P, V]
    first = first_argmax(logits[rows, prompt_lengths - 1])
    prompt_records = (prompt, captured.astype(jnp.bfloat16), *_top(logits, k))

    def step(carry, _):
        cache, token, position = carry  # [B], [B]
        hidden, captured, cache = decoder.run_layers(config, params, token[:, None],
                                                     position[:, None], cache, layers)
        logits = decoder.logits(params, hidden[:, 0])  # [B, V]
        record = (token, captured[:, 0].astype(jnp.bfloat16), *_top(logits, k))
        return (cache, first_argmax(logits), position + 1), record

    _, step_records = jax.lax.scan(step, (cache, first, prompt_lengths), None, length=steps)
    return prompt_records, step_records


def _rows(prompt_records, step_records, prompt_lengths, eos_ids, width) -> Records:
    """Stitch each row's prompt positions and decode steps into one sequence (numpy)."""
    prompt_records = [np.asarray(a) for a in prompt_records]
    step_records = [np.swapaxes(np.asarray(a), 0, 1) for a in step_records]  # [B, steps, ...]
    out = [np.zeros((len(prompt_lengths), width) + a.shape[2:], a.dtype) for a in prompt_records]
    lengths = np.zeros(len(prompt_lengths), np.int32)
    for b, n in enumerate(prompt_lengths):
        seq = [np.concatenate([p[b, :n], s[b]])[:width] for p, s in zip(prompt_records,
                                                                         step_records)]
        generated = seq[0][n:]
        eos = np.flatnonzero(np.isin(generated, eos_ids))
        length = min(len(seq[0]), n + eos[0] + 1) if len(eos) else len(seq[0])
        for array, values in zip(out, seq):
            array[b, :length] = values[:length]
        lengths[b] = length
    return Records(*out, lengths, np.asarray(prompt_lengths, np.int32))


def record(target, prompts: list[list[int]], *, new_tokens: int, layers: tuple[int, ...],
           batch: int = 16, k: int = 16, progress: bool = True) -> Records:
    """Greedy continuations of `prompts` (token ids) by `target`, recorded (see module doc).

    Rows are as wide as the longest prompt plus new_tokens; prompts are grouped by length."""
    config, params = target.config, target.params
    layout = target.layout or default()
    width = max(map(len, prompts)) + new_tokens
    order = np.argsort([len(p) for p in prompts], kind="stable")
    parts = []
    bar = tqdm(total=len(prompts), desc="recording", unit="prompt", disable=not progress)
    for start in range(0, len(order), batch):
        chosen = [prompts[i] for i in order[start:start + batch]]
        chosen += [chosen[-1]] * (batch - len(chosen))  # one compiled shape per prompt width
        lengths = np.array([len(p) for p in chosen], np.int32)
        padded = np.zeros((batch, bucket(int(lengths.max()), 16)), np.int32)
        for b, p in enumerate(chosen):
            padded[b, :len(p)] = p
        out = _generate(config, params, jnp.asarray(padded), jnp.asarray(lengths),
                        layers=layers, steps=new_tokens, k=k, layout=layout)
        real = min(batch, len(order) - start)
        parts.append(_rows(*out, lengths, config.eos_token_ids, width).take(slice(0, real)))
        bar.update(real)
    bar.close()
    records = Records.concatenate(parts)
    inverse = np.argsort(order, kind="stable")  # back to the prompts' order
    return records.take(inverse)


