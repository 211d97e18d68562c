"""Training a draft head: resume, the draft vocabulary, the prompt sources, the recorder, and
scripts/train_draft.py end to end and on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import (REPO, successor_model, tiny_hf_model, trained_head,
                     truncate_largest_file)

from jaxspec.checkpoint import head_store
from jaxspec.errors import UserError
from jaxspec.training import prompts, record, trainer


@pytest.fixture(scope="module")
def target():
    return successor_model(40, eos=(0,))


def test_a_resumed_run_reaches_the_same_params(tmp_path, target):
    """Stopped after 20 steps (an Orbax checkpoint every 10), then resumed to 40: the same
    params, bit for bit, as a run that never stopped."""
    config, _, fitter, (train, held_out) = trained_head(target, draft_vocab=24, steps=1)
    fitter = trainer.Trainer(target, config, np.asarray(fitter.d2t), trainer.TrainConfig(
        steps=40, batch=8, draft_vocab=24, learning_rate=1e-2, warmup=5,
        checkpoint_every=10, eval_every=40, eval_rows=8))
    straight, _ = fitter.fit(train, held_out, str(tmp_path / "a"), progress=False)
    fitter.fit(train, held_out, str(tmp_path / "b"), progress=False, stop_after=20)
    assert sorted(os.listdir(tmp_path / "b")) == ["10", "20"]
    resumed, _ = fitter.fit(train, held_out, str(tmp_path / "b"), progress=False)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    different, _ = trainer.Trainer(target, config, np.asarray(fitter.d2t), dataclass_replace(
        fitter.config, seed=1)).fit(train, held_out, str(tmp_path / "c"), progress=False)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(straight),
                                                        jax.tree.leaves(different)))


def test_a_run_continuing_a_head_starts_from_its_params(target):
    """Trainer(start=...) begins at the given head's params (fresh optimizer state), not at the
    head initialized from the target."""
    config, params, fitter, _ = trained_head(target, draft_vocab=24, steps=5)
    continued = trainer.Trainer(target, config, np.asarray(params["d2t"]), fitter.config,
                                start=params)
    began, _ = continued.init()
    assert "d2t" not in began
    trainable = {k: v for k, v in params.items() if k != "d2t"}
    for a, b in zip(jax.tree.leaves(trainable), jax.tree.leaves(began)):
        np.testing.assert_array_equal(a, b)
    fresh, _ = fitter.init()
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fresh),
                                                        jax.tree.leaves(began)))


def test_a_damaged_training_checkpoint_is_one_line(tmp_path, target, capfd):
    """Resuming from a checkpoint whose tensor data was cut: one UserError naming the folder,
    and no late tracebacks from Orbax's reads on stderr."""
    config, _, fitter, (train, held_out) = trained_head(target, draft_vocab=24, steps=1)
    fitter = trainer.Trainer(target, config, np.asarray(fitter.d2t), trainer.TrainConfig(
        steps=4, batch=8, draft_vocab=24, checkpoint_every=2, eval_every=4, eval_rows=8))
    work = tmp_path / "train_state"
    fitter.fit(train, held_out, str(work), progress=False, stop_after=2)
    truncate_largest_file(str(work / "2"))
    capfd.readouterr()
    with pytest.raises(UserError, match="cannot resume training from") as error:
        fitter.fit(train, held_out, str(work), progress=False)
    assert f"delete {work} to start over" in str(error.value) and "\n" not in str(error.value)
    assert "Traceback" not in capfd.readouterr().err


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_draft_vocabulary_is_the_most_frequent_tokens_and_eos():
    tokens = np.array([[5, 5, 5, 7, 7, 9, 0, 0]], np.int32)
    records = record.Records(tokens, np.zeros((1, 8, 1, 2)), tokens[..., None] + 1,
                             np.zeros((1, 8, 1), np.float32), np.array([6], np.int32),
                             np.array([2], np.int32))
    d2t = trainer.draft_vocabulary(records, 3, eos_ids=(2,), vocab=12)
    assert d2t.tolist() == [2, 5, 6]  # EOS, then 5 (input 3 times) and 6 (top choice 3 times)
    t2d = trainer.target_to_draft(d2t, 12)
    assert t2d[d2t].tolist() == [0, 1, 2] and (t2d >= 0).sum() == 3


def test_recorded_rows_are_the_targets_greedy_text(target):
    """Each row: the prompt, then the target's greedy tokens, cut after the first EOS; the
    recorded top token at every generated position is the next token."""
    from helpers import greedy_reference

    ps = [[5, 9, 3], [4, 4, 11, 13, 2]]
    recs = record.record(target, ps, new_tokens=12, layers=(1, 2), batch=4, k=4,
                         progress=False)
    reference = greedy_reference(target, ps, 12)
    for row, (p, new) in enumerate(zip(ps, reference)):
        n = recs.lengths[row]
        assert recs.tokens[row, :n].tolist() == (p + new)[:n]
        assert n == len(p) + len(new)  # every generated token is an input (EOS: the last)
        np.testing.assert_array_equal(recs.top_ids[row, len(p) - 1:n - 1, 0], new[:n - len(p)])
        assert np.all(np.diff(recs.top_logp[row, :n], axis=-1) <= 0)
    assert recs.hidden.shape[2:] == (2, target.config.hidden_size)


@pytest.mark.parametrize("generate", [prompts.generated, prompts.compound])
def test_generated_prompts_are_distinct_seeded_and_not_the_benchmarks(generate):
    a, b = generate(500, 0), generate(500, 0)
    assert a == b and len(set(a)) == 500 and generate(500, 1) != a
    with open(os.path.join(REPO, "scripts", "prompts", "suite.jsonl"), encoding="utf-8") as f:
        bench = {json.loads(line)["prompt"] for line in f if line.strip()}
    assert not bench & set(generate(10_000, 0))


def test_compound_requests_have_several_parts():
    for request in prompts.compound(200, 3):
        assert request.count("?") >= 1 and request.count(".") >= 2, request
        assert any(subject in request for subject in prompts.SUBJECTS)


def _script(*args, name="train_draft.py"):
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", name), *args],
                          capture_output=True, text=True, cwd=REPO)


def test_distill_draft_is_the_same_script(tmp_path):
    """DESIGN.md names the script distill_draft.py: it runs train_draft.py, flags and all."""
    (tmp_path / "file").write_text("")
    args = ["--output", str(tmp_path / "file" / "work"), "--steps", "2"]
    proc, same = _script(*args, name="distill_draft.py"), _script(*args)
    assert proc.returncode == same.returncode == 2
    assert proc.stderr == same.stderr and proc.stderr.startswith("error: cannot write")
    help_text = _script("--help", name="distill_draft.py")
    assert help_text.returncode == 0 and "--self-written" in help_text.stdout


@pytest.mark.parametrize("case", ["unwritable", "missing-text", "bad-model", "no-tokenizer",
                                  "negative-count", "init-not-a-head", "init-other-target"])
def test_train_draft_refuses_bad_input_before_training(tmp_path, case):
    model = tiny_hf_model("llama", tmp_path, with_tokenizer=case != "no-tokenizer")
    out = tmp_path / "work"
    args = ["--output", str(out), "--model", model, "--steps", "2"]
    if case == "unwritable":  # under a regular file (unwritable even for root)
        (tmp_path / "file").write_text("")
        args[1] = str(tmp_path / "file" / "work")
    elif case == "missing-text":
        args += ["--text", str(tmp_path / "nope.txt")]
    elif case == "bad-model":
        args[3] = str(tmp_path / "no-such-model")
    elif case == "negative-count":
        args += ["--self-written", "-1"]
    elif case == "init-not-a-head":
        args += ["--init", model]
    elif case == "init-other-target":  # a head for a target of another vocabulary
        other = successor_model(40)
        config, params, _, _ = trained_head(other, draft_vocab=24, steps=1, rows=16)
        head_store.save(str(tmp_path / "head"), config, params, target_params=other.params,
                        dtype="float32", gamma=2, threshold=0.0, training={})
        args += ["--init", str(tmp_path / "head")]
    proc = _script(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert not (out / "train_state").exists() and not (out / "records.npz").exists()


def test_train_draft_end_to_end_then_generate(tmp_path):
    """A tiny run: the target writes a request, records, trains, writes a head that the CLI
    uses as --draft, and a second invocation resumes (nothing left to train) and rewrites the
    head with a new γ."""
    model = tiny_hf_model("llama", tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("First paragraph about tea.\n\nSecond paragraph about coffee.\n")
    work, head = tmp_path / "work", tmp_path / "head"
    args = ["--output", str(work), "--head", str(head), "--model", model, "--text", str(text),
            "--prompts", "10", "--compound", "3", "--self-written", "1", "--new-tokens", "8",
            "--steps", "4",
            "--batch", "4",
            "--draft-vocab", "32", "--checkpoint-every", "2"]
    proc = _script(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tau=" in proc.stdout
    meta = head_store.read_meta(str(head))
    assert meta["gamma"] == 4 and meta["training"]["train_rows"] + meta["training"][
        "held_out_rows"] == 16  # 10 + 3 generated, 1 self-written, the file's 2 paragraphs
    with open(work / "requests.json", encoding="utf-8") as f:
        texts = json.load(f)
    assert len(texts) == 16 and texts[:10] == prompts.generated(10, 0)
    assert texts[14:] == ["Continue this text:\nFirst paragraph about tea.",
                          "Continue this text:\nSecond paragraph about coffee."]
    assert sorted(os.listdir(work / "train_state")) == ["2", "4"]
    proc = _script(*args, "--gamma", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert head_store.read_meta(str(head))["gamma"] == 2
    gen = subprocess.run([sys.executable, "-m", "jaxspec.generate", "--model", model, "--draft",
                          str(head), "hello", "--max-new-tokens", "12", "--json"],
                         capture_output=True, text=True, cwd=REPO)
    plain = subprocess.run([sys.executable, "-m", "jaxspec.generate", "--model", model,
                            "--draft", "none", "hello", "--max-new-tokens", "12", "--json"],
                           capture_output=True, text=True, cwd=REPO)
    assert gen.returncode == 0 and plain.returncode == 0, gen.stderr[-2000:]
    spec, ref = json.loads(gen.stdout), json.loads(plain.stdout)
    assert spec["tokens"] == ref["tokens"] and spec["stats"]["num_speculative_tokens"] == 2
    # continuing the head on new data (another seed): its vocabulary and layers, provenance
    more = args[:args.index("--prompts")] + ["--prompts", "6", "--new-tokens", "8", "--steps",
                                             "2", "--batch", "4", "--seed", "1"]
    more[more.index("--output") + 1], more[more.index("--head") + 1] = (str(tmp_path / "work2"),
                                                                       str(tmp_path / "head2"))
    proc = _script(*more, "--init", str(head))
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = head_store.load(str(head)), head_store.load(str(tmp_path / "head2"))
    assert second.meta["d2t_sha256"] == first.meta["d2t_sha256"]
    assert second.config == first.config
    assert second.meta["training"]["init"]["path"] == str(head)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first.params),
                                                        jax.tree.leaves(second.params)))


def test_metrics_count_only_the_entries_that_propose(target):
    """Agreement is measured where the head proposes at inference (entries from the last prompt
    position on), not on the prompt's own next tokens; the same batch with the whole row
    counted as generated gives the all-entries agreement."""
    import jax.numpy as jnp

    from jaxspec.drafts import head as heads
    from jaxspec.training import objective

    config, params, _, (_, held_out) = trained_head(target, draft_vocab=24, steps=30)
    d2t = np.asarray(params["d2t"])
    t2d = trainer.target_to_draft(d2t, target.config.vocab_size)
    trainable = {k: v for k, v in params.items() if k != "d2t"}
    outs = objective.unrolled(config, params, target.params["embed"],
                              jnp.asarray(held_out.tokens), jnp.asarray(held_out.hidden), 1)
    predicted = d2t[np.asarray(jnp.argmax(heads.head_logits(config, params, outs[0]), -1))]
    agrees = predicted[:, :-1] == held_out.top_ids[:, 1:, 0]  # entry p vs the target at p + 1

    def expected(first):
        rows = [agrees[b, f:n - 1] for b, (f, n) in enumerate(zip(first, held_out.lengths))]
        return np.concatenate(rows).mean()

    measured = {}
    for name, starts in (("generated", held_out.prompt_lengths),
                         ("all", np.ones_like(held_out.prompt_lengths))):
        batch = {"tokens": held_out.tokens, "hidden": held_out.hidden,
                 "top_ids": held_out.top_ids, "top_logp": held_out.top_logp,
                 "lengths": held_out.lengths, "prompt_lengths": starts}
        _, metrics = objective.losses(config, trainable, jnp.asarray(d2t), jnp.asarray(t2d),
                                      target.params["embed"], batch, 1)
        measured[name] = float(metrics["agree1"])
        np.testing.assert_allclose(measured[name], expected(starts - 1), rtol=1e-6)
    assert measured["generated"] != measured["all"]


def test_the_output_layer_runs_only_on_the_entries_that_count(target):
    """The loss and metrics over each row's proposing entries (the trainer's window) equal
    those over every position; a window too short for the rows leaves entries out."""
    import jax.numpy as jnp

    from jaxspec.training import objective

    config, params, _, (train, _) = trained_head(target, draft_vocab=24, steps=1)
    d2t = np.asarray(params["d2t"])
    t2d = trainer.target_to_draft(d2t, target.config.vocab_size)
    trainable = {k: v for k, v in params.items() if k != "d2t"}
    rows = train.take(slice(0, 16))
    batch = {k: jnp.asarray(getattr(rows, k)) for k in
             ("tokens", "hidden", "top_ids", "top_logp", "lengths", "prompt_lengths")}
    window = objective.window(rows.lengths, rows.prompt_lengths)
    assert window < rows.tokens.shape[1]  # the prompts' entries are left out

    losses = jax.jit(objective.losses, static_argnums=(0, 6, 7))

    def measured(w):
        loss, metrics = losses(config, trainable, jnp.asarray(d2t), jnp.asarray(t2d),
                               target.params["embed"], batch, 3, w)
        return {k: float(v) for k, v in metrics.items()}

    full, windowed = measured(None), measured(window)
    assert full.keys() == windowed.keys() == {"agree1", "agree2", "agree3", "tau", "loss"}
    for key in full:
        np.testing.assert_allclose(windowed[key], full[key], rtol=1e-5, err_msg=key)
    assert measured(window - 3)["loss"] != pytest.approx(full["loss"], rel=1e-5)
