"""The training loop: optax AdamW (warmup + cosine schedule, gradient clipping) on the unrolled
objective, batches drawn from the recorded rows by a seeded generator, Orbax checkpoints of the
whole training state every N steps, and resume that continues the same run.

A run is a pure function of (records, TrainConfig): batch i is drawn from
numpy.random.default_rng([seed, i]), so a run resumed from step s makes the same updates as
one that never stopped (tested).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from jaxspec.checkpoint import orbax_io
from jaxspec.checkpoint.source import one_line
from jaxspec.drafts import head as heads
from jaxspec.errors import UserError
from jaxspec.training import objective
from jaxspec.training.record import Records


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch: int = 8  # rows per step
    unroll: int = 3  # K, draft steps trained per chain
    learning_rate: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    clip: float = 1.0  # global gradient norm
    draft_vocab: int = 8192
    seed: int = 0
    checkpoint_every: int = 200
    eval_every: int = 100
    eval_rows: int = 64  # held-out rows evaluated


def _resume(manager, step: int, params, opt_state, directory: str):
    """(params, opt_state) of the checkpoint at `step`; UserError (one line) when it cannot be
    restored."""
    try:
        state = manager.restore(step, args=ocp.args.StandardRestore(
            {"params": params, "opt_state": opt_state}))
    except Exception as e:  # Orbax/tensorstore raise many types for damaged checkpoints
        raise UserError(f"cannot resume training from {directory}/{step}: "
                        f"{one_line(e)[:300]}; delete {directory} to start over") from None
    return state["params"], state["opt_state"]


def draft_vocabulary(records: Records, size: int, eos_ids, vocab: int) -> np.ndarray:
    """d2t [size]: the target's most frequent tokens in the records (recorded inputs and the
    target's top choices), EOS ids always included, ascending ids."""
    valid = np.arange(records.tokens.shape[1])[None] < records.lengths[:, None]
    counts = np.bincount(records.tokens[valid], minlength=vocab)
    counts += np.bincount(records.top_ids[..., 0][valid], minlength=vocab)
    counts[list(eos_ids)] = counts.max() + 1
    size = min(size, vocab)
    return np.sort(np.argsort(-counts, kind="stable")[:size]).astype(np.int32)


def target_to_draft(d2t: np.ndarray, vocab: int) -> np.ndarray:
    """t2d [V]: the draft id of each target id, -1 outside the draft vocabulary."""
    t2d = np.full(vocab, -1, np.int32)
    t2d[d2t] = np.arange(len(d2t), dtype=np.int32)
    return t2d


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, min(config.warmup, config.steps - 1), config.steps,
        end_value=config.learning_rate * 0.05)
    return optax.chain(optax.clip_by_global_norm(config.clip),
                       optax.adamw(schedule, weight_decay=config.weight_decay))


def _batch(records: Records, rows) -> dict:
    """The rows as the objective's batch, at the records' full width (one compiled shape)."""
    chosen = records.take(rows)
    return {f.name: getattr(chosen, f.name) for f in dataclasses.fields(chosen)}


def _window(records: Records) -> int:
    return objective.window(records.lengths, records.prompt_lengths)


def batch_rows(config: TrainConfig, step: int, rows: int) -> np.ndarray:
    """The rows of training batch `step` (a pure function of the seed and the step)."""
    return np.random.default_rng([config.seed, step]).choice(rows, config.batch, replace=False)


class Trainer:
    """Trains a head for `target` on `records` (train rows) with `held_out` for evaluation."""

    def __init__(self, target, head_config: heads.HeadConfig, d2t, config: TrainConfig,
                 start: dict | None = None):
        """`start`: the head params (fp32; d2t, if there, is ignored) a fresh run starts from,
        e.g. a trained head's to continue it on new data; default: the head initialized from
        the target."""
        self.target, self.head_config, self.config = target, head_config, config
        self.start = start
        self.d2t = jnp.asarray(d2t)
        self.t2d = jnp.asarray(target_to_draft(np.asarray(d2t), head_config.target.vocab_size))
        self.embed = target.params["embed"]
        self.tx = optimizer(config)
        frozen = (self.d2t, self.t2d, self.embed)

        def loss(params, batch, frozen, window):
            return objective.losses(head_config, params, *frozen, batch, config.unroll, window)

        def update(params, opt_state, batch, frozen, window):
            grads, metrics = jax.grad(loss, has_aux=True)(params, batch, frozen, window)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, metrics

        update = jax.jit(update, static_argnums=4)
        metrics = jax.jit(lambda *args: loss(*args)[1], static_argnums=3)
        # window: the records' objective.window, static (one compiled shape per record set)
        self._update = lambda params, opt_state, batch, window: update(params, opt_state, batch,
                                                                        frozen, window)
        self._evaluate = lambda params, batch, window: metrics(params, batch, frozen, window)

    def init(self):
        """(params, opt_state) of a fresh run: `start`, else the head initialized from the
        target."""
        head = self.start if self.start is not None else heads.init_params(
            self.head_config, jax.random.key(self.config.seed), self.target.params, self.d2t)
        params = {k: v for k, v in head.items() if k != "d2t"}
        return params, self.tx.init(params)

    def evaluate(self, params, records: Records) -> dict:
        """Mean metrics over held-out rows, in batches of config.batch."""
        parts, window = [], _window(records)
        for start in range(0, len(records), self.config.batch):
            rows = np.arange(start, min(start + self.config.batch, len(records)))
            parts.append(jax.device_get(self._evaluate(params, _batch(records, rows), window)))
        return {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}

    def fit(self, records: Records, held_out: Records, directory: str, *,
            progress: bool = True, stop_after: int | None = None):
        """Train to config.steps (or `stop_after` steps, to test resume), continuing from the
        latest checkpoint in `directory`. Returns (params, last held-out metrics)."""
        config = self.config
        params, opt_state = self.init()
        options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
        directory = os.path.abspath(directory)
        with orbax_io.finishing_loops(), ocp.CheckpointManager(
                directory, options=options) as manager:
            start = manager.latest_step() or 0
            if start:
                params, opt_state = _resume(manager, start, params, opt_state, directory)
            end = min(config.steps, stop_after or config.steps)
            metrics, window = {}, _window(records)
            bar = tqdm(range(start, end), desc="training", unit="step", disable=not progress,
                       initial=start, total=config.steps)
            for step in bar:
                batch = _batch(records, batch_rows(config, step, len(records)))
                params, opt_state, train_metrics = self._update(params, opt_state, batch, window)
                done = step + 1
                if done % config.eval_every == 0 or done == end:
                    metrics = self.evaluate(params, held_out.take(slice(0, config.eval_rows)))
                    bar.set_postfix(loss=f"{float(train_metrics['loss']):.3f}",
                                    heldout_tau=f"{metrics['tau']:.2f}",
                                    heldout_agree1=f"{metrics['agree1']:.2f}")
                if done % config.checkpoint_every == 0 or done == end:
                    manager.save(done, args=ocp.args.StandardSave(
                        {"params": params, "opt_state": opt_state}))
            manager.wait_until_finished()
        if not metrics:  # nothing left to train: evaluate what was restored
            metrics = self.evaluate(params, held_out.take(slice(0, config.eval_rows)))
        return params, metrics
