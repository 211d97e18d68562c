"""One training run, start to finish: check the inputs, record on-policy data, choose the draft
vocabulary, train, save the head. `scripts/train_draft.py` is its command line.

The work directory holds everything a resumed run needs:

    recipe.json    the data recipe and seed; records.npz is reused only when they match
    requests.json  the requests' texts, in the records' order
    records.npz    the recorded rows (jaxspec.training.record)
    vocab.npy      d2t, the draft vocabulary (a run continuing a head takes the head's)
    train_state/   Orbax checkpoints of params and optimizer state (jaxspec.training.trainer)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from jaxspec.errors import UserError
from jaxspec.training import prompts as prompt_sources
from jaxspec.training import self_written
from jaxspec.training.record import Records, record
from jaxspec.training.trainer import TrainConfig, Trainer, draft_vocabulary


@dataclasses.dataclass(frozen=True)
class DataRecipe:
    prompts: int = 1280  # built-in one-line requests (prompts.generated)
    compound: int = 0  # built-in multi-part requests (prompts.compound)
    self_written: int = 0  # requests the target writes itself (training.self_written)
    text_files: tuple[str, ...] = ()
    new_tokens: int = 160  # greedy tokens recorded per prompt
    held_out: float = 0.05  # fraction of prompts kept for evaluation
    top_k: int = 16  # target log-probabilities recorded per position
    batch: int = 64  # rows decoded at once while recording


def check_work_dir(path: str) -> None:
    """Create the work directory and prove it writable, or raise UserError."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to the output directory {path}: {e.strerror}") from None


def request_texts(target, recipe: DataRecipe, seed: int) -> list[str]:
    """The training requests: one-line ones, multi-part ones, those the target writes, then
    the text files' paragraphs (the held-out rows are the last ones)."""
    return (prompt_sources.generated(recipe.prompts, seed)
            + prompt_sources.compound(recipe.compound, seed)
            + self_written.requests(target, recipe.self_written, seed)
            + prompt_sources.from_files(recipe.text_files))


def recorded(target, recipe: DataRecipe, seed: int, layers, work_dir: str) -> Records:
    """The records of the recipe's requests, from the work directory when its recipe and seed
    match; a new recording also writes the requests' texts to requests.json."""
    from jaxspec import bench

    path, recipe_path = (os.path.join(work_dir, n) for n in ("records.npz", "recipe.json"))
    wanted = {**dataclasses.asdict(recipe), "layers": list(layers), "seed": seed}
    if os.path.exists(path) and os.path.exists(recipe_path):
        with open(recipe_path, encoding="utf-8") as f:
            if json.load(f) == json.loads(json.dumps(wanted)):
                return Records.load(path)
    texts = request_texts(target, recipe, seed)
    ids = [bench.prompt_ids(target, text) for text in texts]
    records = record(target, ids, new_tokens=recipe.new_tokens, layers=layers,
                     batch=recipe.batch, k=recipe.top_k)
    records.save(path)
    for name, value in (("requests.json", texts), ("recipe.json", wanted)):
        with open(os.path.join(work_dir, name), "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2, ensure_ascii=False)
    return records


def starting_head(target, path: str):
    """The trained head at `path` that a run continues from, loaded in fp32; UserError (one
    line) when it is not a head, or was trained for another target or other weights."""
    from jaxspec.checkpoint import head_store

    if not head_store.is_head_dir(path):
        raise UserError(f"--init {path} is not a draft head directory")
    head = head_store.load(path)
    head_store.check_target(head, target, where=f"--init {path}")
    if not head_store.matches(head.meta, target):
        raise UserError(f"--init {path} was trained on other weights than this target's")
    return head


def _vocabulary(work_dir: str, train: Records, config: TrainConfig, target, start) -> np.ndarray:
    """d2t: the work directory's, else the starting head's, else the most frequent tokens of
    the training rows (saved to vocab.npy)."""
    path = os.path.join(work_dir, "vocab.npy")
    if start is not None:
        d2t = np.asarray(start.params["d2t"])
        if os.path.exists(path) and not np.array_equal(np.load(path), d2t):
            raise UserError(f"{work_dir} was started with another draft vocabulary than "
                            "--init's; use a new --output directory")
    elif os.path.exists(path):
        return np.load(path)
    else:
        d2t = draft_vocabulary(train, config.draft_vocab, target.config.eos_token_ids,
                               target.config.vocab_size)
    np.save(path, d2t)
    return d2t


def train_draft(target, work_dir: str, head_path: str, *, recipe: DataRecipe,
                config: TrainConfig, gamma: int, threshold: float, command: str = "",
                progress: bool = True, init: str | None = None) -> dict:
    """The whole run (resumes from `work_dir`); writes the head to head_path and returns the
    held-out metrics. `init`: a trained head to continue from (its layers, vocabulary and
    params) instead of a head initialized from the target."""
    from jaxspec.drafts import head as heads
    from jaxspec.checkpoint import head_store

    started = time.time()
    start = starting_head(target, init) if init else None
    layers = (tuple(start.config.hidden_layers) if start
              else heads.default_layers(target.config.num_layers))
    records = recorded(target, recipe, config.seed, layers, work_dir)
    held = max(1, int(round(len(records) * recipe.held_out)))
    train, held_out = records.take(slice(0, len(records) - held)), records.take(
        slice(len(records) - held, None))
    d2t = _vocabulary(work_dir, train, config, target, start)
    head_config = heads.HeadConfig(target.config, layers, len(d2t))
    trainer = Trainer(target, head_config, d2t, config, start=start and start.params)
    params, metrics = trainer.fit(train, held_out, os.path.join(work_dir, "train_state"),
                                  progress=progress)
    trained_tokens = int(train.lengths.sum())
    training = {"command": command, "seed": config.seed, "recipe": dataclasses.asdict(recipe),
                "train": dataclasses.asdict(config), "train_rows": len(train),
                "train_positions": trained_tokens, "held_out_rows": len(held_out),
                "held_out": metrics, "seconds_this_invocation": round(time.time() - started)}
    if start:
        training["init"] = {"path": init, "training": start.meta.get("training", {})}
    head_store.save(head_path, head_config, {**params, "d2t": d2t},
                    target_params=target.params, dtype="bfloat16", gamma=gamma,
                    threshold=threshold, training=training)
    return metrics


def check_text_files(paths) -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"no such text file: {path}")
    prompt_sources.from_files(paths)  # readable and UTF-8


def raise_if_unusable(target) -> None:
    """A target the head cannot train on: no tokenizer (the prompts are text)."""
    if target.tokenizer is None:
        raise UserError(f"{target.path} has no tokenizer files: the training prompts are text")
