"""`scripts/benchmark.py --suite` (jaxspec.bench_suite, jaxspec.bench_report).

One end-to-end run on a tiny random Hugging Face llama (every draft kind, transformers greedy,
prompt lookup and an assistant model) checks the JSON, the Markdown and the PNGs; a malformed
prompts file is checked in a real subprocess (exit 2, one line naming the line number); the
rest is cheap and in-process.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, tiny_hf_model

from jaxspec import bench_prompts, bench_suite
from jaxspec.decode.sizing import loop_max_len
from jaxspec.errors import UserError

SCRIPT = os.path.join(REPO, "scripts", "benchmark.py")
SUITE_PROMPTS = os.path.join(REPO, "scripts", "prompts", "suite.jsonl")
CATEGORY_KEYS = {"prompts", "new_tokens", "seconds_best", "seconds_median", "tok_s",
                 "tok_s_median", "identical_to_plain", "speedup", "vs_jaxspec_plain"}
DRAFT_KEYS = {"acceptance_rate", "mean_accepted_length", "accepted_per_position",
              "predicted_speedup", "measured_over_predicted"}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prompt_set_has_eight_per_category():
    prompts = bench_prompts.load_prompts(SUITE_PROMPTS)
    counts = collections.Counter(p.category for p in prompts)
    assert set(counts) == set(bench_suite.CATEGORIES), counts
    assert min(counts.values()) >= 8, counts


def test_suite_end_to_end(script, tmp_path, capsys):
    model = tiny_hf_model("llama", tmp_path)
    out_json, out_png = tmp_path / "suite.json", tmp_path / "suite.png"
    rc = script.main([
        "--suite", "--model", model, "--draft", model, "--drafts", "ngram,layerskip:1",
        "--gammas", "1,2", "--categories", "code,chat", "--prompts-per-category", "1",
        "--max-new-tokens", "6", "--cost-steps", "2", "--copy-mb", "512",
        "--out-json", str(out_json), "--out-png", str(out_png)])
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert {"machine", "settings", "prompts", "hardware", "costs", "configs",
            "peak_rss_mib", "notes"} <= set(result)
    assert {"cpu_model", "cpu_count", "backend", "jax", "jaxlib", "date"} <= set(
        result["machine"])
    assert set(result["hardware"]["floor_tok_s"]) == {
        "copy_1_thread", "copy_all_cores", "read_1_thread", "read_all_cores"}
    configs = {c["name"]: c for c in result["configs"]}
    name = os.path.basename(model)
    for gamma in (1, 2):
        for draft in ("ngram", "layerskip:1", name):
            config = configs[f"jaxspec {draft} γ={gamma}"]
            assert {"c", "v", "compile_seconds", "peak_rss_growth_mib"} <= set(config)
            for category in ("code", "chat", "all"):
                numbers = config["categories"][category]
                assert CATEGORY_KEYS | DRAFT_KEYS <= set(numbers), category
                assert len(numbers["accepted_per_position"]) == gamma
                assert numbers["identical_to_plain"] == numbers["prompts"]  # exact greedy
    assert configs[f"jaxspec {name} γ=2"]["categories"]["all"]["acceptance_rate"] == 1.0
    assert {"transformers greedy", "transformers prompt lookup γ=2",
            "transformers assistant γ=2"} <= set(configs)
    out = capsys.readouterr().out
    assert "| configuration |" in out and "| jaxspec ngram γ=2 |" in out
    for suffix in ("_speedup.png", "_acceptance.png"):
        with open(tmp_path / f"suite{suffix}", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_suite_measures_a_draft_heads_cost(script, tmp_path):
    """A draft head as --draft: timed like the other drafts, with c > 0 from its own step
    timers (proposals and the observe), and output identical to plain decoding."""
    from helpers import trained_head

    from jaxspec.checkpoint.load import load_model
    from jaxspec.checkpoint import head_store

    model = tiny_hf_model("llama", tmp_path)
    target = load_model(model)
    config, params, *_ = trained_head(target, draft_vocab=32, steps=2, rows=16)
    head = str(tmp_path / "head")
    head_store.save(head, config, params, target_params=target.params, dtype="float32",
                    gamma=2, threshold=0.0, training={})
    out_json = tmp_path / "suite.json"
    rc = script.main([
        "--suite", "--model", model, "--draft", head, "--drafts", "", "--gammas", "2",
        "--categories", "chat", "--prompts-per-category", "1", "--max-new-tokens", "6",
        "--cost-steps", "2", "--copy-mb", "512", "--no-hf", "--out-json", str(out_json),
        "--out-png", str(tmp_path / "suite.png")])
    assert rc == 0
    result = json.loads(out_json.read_text())
    config = {c["name"]: c for c in result["configs"]}["jaxspec head γ=2"]
    assert 0 < config["c"] < 10
    assert config["categories"]["all"]["identical_to_plain"] == 1
    timed = set(result["costs"]["seconds_per_step"])
    assert f"{head}-observe2" in timed and any(k.startswith(f"{head}@") for k in timed)


def test_malformed_prompts_line_fails_with_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"category": "code", "prompt": "Write a loop."}\n\n'
                   '{"category": "chat", "prompt": "Hi"\n', encoding="utf-8")
    done = subprocess.run([sys.executable, SCRIPT, "--suite", "--prompts", str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("benchmark: error: "), done.stderr
    assert f"{bad} line 3:" in lines[0]


@pytest.mark.parametrize("line, message", [
    ('["code", "x"]', "expected a JSON object"),
    ('{"category": "code"}', '"prompt" must be a non-empty string'),
    ('{"category": "", "prompt": "x"}', '"category" must be a non-empty string'),
    ('{"category": "code", "prompt": 3}', '"prompt" must be a non-empty string'),
])
def test_prompt_line_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"category": "code", "prompt": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=f"line 2: {message}"):
        bench_prompts.load_prompts(str(path))


def test_select_prompts_per_category_and_unknown_category():
    prompts = bench_prompts.load_prompts(SUITE_PROMPTS)
    chosen = bench_prompts.select_prompts(prompts, ["chat", "code"], 2)
    assert [p.category for p in chosen] == ["chat", "chat", "code", "code"]
    with pytest.raises(UserError, match="no prompts in category 'poetry'"):
        bench_prompts.select_prompts(prompts, ["poetry"], 2)


def test_ar_and_spec_defaults_unchanged_and_suite_options_need_suite(script):
    spec = script.parse_args(["--spec"])
    assert (spec.draft, spec.gammas, spec.max_new_tokens, spec.repeats, spec.out_json,
            spec.out_png) == ("layerskip:8", [1, 2, 3, 4, 6, 8], 128, 3, "bench.json",
                              "bench.png")
    suite = script.parse_args(["--suite"])
    assert (suite.gammas, suite.drafts, suite.max_new_tokens, suite.hf_gammas) == (
        list(range(1, 9)), ["ngram", "layerskip:8"], 64, [2, 4, 8])
    with pytest.raises(SystemExit) as e:
        script.parse_args(["--ar", "--categories", "code"])
    assert e.value.code == 2


@pytest.mark.parametrize("prompt_length, n, gamma", [(100, 64, 1), (100, 64, 8), (5, 200, 3)])
def test_warmup_uses_the_same_buffer_size(prompt_length, n, gamma):
    k = bench_suite.warmup_tokens(prompt_length, n, gamma)
    assert loop_max_len(prompt_length, k, gamma) == loop_max_len(prompt_length, n, gamma)
    assert k == 1 or loop_max_len(prompt_length, k - 1, gamma) < loop_max_len(
        prompt_length, n, gamma)


def test_stream_mode_end_to_end(script, tmp_path, capsys):
    """--stream: the CLI's streamed path and the library's, same tokens, a ratio, a PNG."""
    model = tiny_hf_model("llama", tmp_path)
    out_json, out_png = tmp_path / "stream.json", tmp_path / "stream.png"
    rc = script.main(["--stream", "--model", model, "--draft", "ngram", "--max-new-tokens", "8",
                      "--repeats", "2", "--out-json", str(out_json), "--out-png", str(out_png)])
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert result["same_tokens"] and result["gamma"] == 4
    rates = result["rates_tok_s"]
    assert set(rates) == {"library", "cli_stream"} and all(len(v["all"]) == 2
                                                           for v in rates.values())
    ratio = result["targets"]["stream_ratio"]["value"]
    assert ratio == pytest.approx(rates["cli_stream"]["median"] / rates["library"]["median"])
    assert "streamed ÷ library" in capsys.readouterr().out
    with open(out_png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_batches_mode_end_to_end(script, tmp_path, capsys):
    """--batches: plain, the default γ and fixed γ per batch size, same tokens, a PNG."""
    model = tiny_hf_model("llama", tmp_path)
    out_json, out_png = tmp_path / "batches.json", tmp_path / "batches.png"
    rc = script.main(["--batches", "--model", model, "--draft", "ngram", "--batch-sizes", "3,1",
                      "--gammas", "1", "--max-new-tokens", "6", "--repeats", "2",
                      "--out-json", str(out_json), "--out-png", str(out_png)])
    assert rc == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert [row["batch"] for row in rows] == [1, 3]
    for row in rows:
        assert row["same_tokens"] and set(row["tok_s"]) == {"plain", "default", "gamma1"}
        assert all(len(v) == 2 for v in row["all_tok_s"].values())
        assert row["speedup"]["default"] == pytest.approx(
            row["tok_s"]["default"] / row["tok_s"]["plain"])
        assert row["default_gamma"] == 4 and row["default_gamma_source"] == "fixed"
    assert "| 3 |" in capsys.readouterr().out
    with open(out_png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as e:
        script.parse_args(["--ar", "--batch-sizes", "2"])
    assert e.value.code == 2


def test_prefill_mode_end_to_end(script, tmp_path, capsys):
    """--prefill: time to first token per prompt length, jaxspec and transformers on the same
    weights (the same first token), a ratio and its target, a PNG; a prompt length the model
    cannot take fails with one line."""
    model = tiny_hf_model("llama", tmp_path)
    out_json, out_png = tmp_path / "prefill.json", tmp_path / "prefill.png"
    rc = script.main(["--prefill", "--model", model, "--prompt-tokens", "40,70", "--repeats",
                      "2", "--out-json", str(out_json), "--out-png", str(out_png)])
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert list(result["lengths"]) == ["40", "70"]
    for row in result["lengths"].values():
        assert row["first_tokens_identical"]
        assert all(len(row[k]["all"]) == 2 for k in ("jaxspec", "transformers"))
        assert row["ratio"] == pytest.approx(row["jaxspec"]["best"]
                                             / row["transformers"]["best"])
    target = result["targets"]["jaxspec ÷ transformers time, worst length"]
    assert target["value"] == max(row["ratio"] for row in result["lengths"].values())
    assert "| 70 |" in capsys.readouterr().out
    with open(out_png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert script.main(["--prefill", "--model", model, "--prompt-tokens", "100000"]) == 2
    assert "at most" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        script.parse_args(["--ar", "--prompt-tokens", "20"])
    assert e.value.code == 2


def test_startup_mode_end_to_end(script, tmp_path, capsys):
    """--startup: whole CLI processes, cold then warm with and without the program cache; the
    warm processes load the programs the cold one saved (less compile time), same text."""
    model = tiny_hf_model("llama", tmp_path)
    out_json, out_png = tmp_path / "startup.json", tmp_path / "startup.png"
    rc = script.main(["--startup", "--model", model, "--repeats", "1", "--out-json",
                      str(out_json), "--out-png", str(out_png)])
    assert rc == 0
    result = json.loads(out_json.read_text())
    rows = result["rows"]
    assert set(rows) == {"cold", "warm", "warm_xla"} and result["same_text"]
    assert all(len(row["walls"]) == 1 and row["wall_s"] > 0 for row in rows.values())
    assert rows["warm"]["programs_s"] < rows["cold"]["programs_s"]
    assert all(row["model_s"] > 0 and row["decode_s"] > 0 for row in rows.values())
    assert set(result["targets"]) == {"warm", "cold"}
    out = capsys.readouterr().out
    assert "| warm_xla |" in out and "start" in out
    with open(out_png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_exactness_mode_end_to_end(script, tmp_path, capsys):
    """--exactness: speculative == plain greedy output on every prompt (fp32 on CPU)."""
    model = tiny_hf_model("llama", tmp_path)
    out_json, out_png = tmp_path / "exact.json", tmp_path / "exact.png"
    rc = script.main(["--exactness", "--model", model, "--draft", "layerskip:1", "--gammas",
                      "2,3", "--repeats", "3", "--max-new-tokens", "10", "--out-json",
                      str(out_json), "--out-png", str(out_png)])
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert [row["gamma"] for row in result["rows"]] == [2, 3]
    for row in result["rows"]:
        assert row["prompts"] == 3 and row["tokens_compared"] == 30
        assert row["mismatching_prompts"] == 0 and row["mismatches"] == []
    assert "| 2 | 3 | 0 | 0.00 | - |" in capsys.readouterr().out
    with open(out_png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_first_mismatch_counts_a_length_difference():
    from jaxspec.bench_exactness import first_mismatch

    assert first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert first_mismatch([1, 2, 3], [1, 5, 3]) == 1
    assert first_mismatch([1, 2, 3], [1, 2]) == 2


def test_preset_options(script):
    args = script.parse_args(["--spec", "--preset", "llama3-8b", "--device", "cpu"])
    assert args.draft == "self" and args.dtype is None
    assert script.parse_args(["--exactness"]).gammas == [2, 4]
    for argv in (["--suite", "--preset", "llama3-8b"], ["--ar", "--dtype", "float32"],
                 ["--ar", "--preset", "smollm2-135m", "--random"]):
        with pytest.raises(SystemExit) as e:
            script.parse_args(argv)
        assert e.value.code == 2


@pytest.mark.optimized
def test_ar_mode_on_a_preset(script, tmp_path, capsys):
    """--ar --preset: random weights of SmolLM2's shape made on the device; the device's own
    copy bandwidth is a floor too; no transformers comparison (no weights to give it)."""
    out_json = tmp_path / "ar.json"
    rc = script.main(["--ar", "--preset", "smollm2-135m", "--dtype", "float32", "--device",
                      "cpu", "--max-new-tokens", "4", "--repeats", "1", "--cost-steps", "1",
                      "--copy-mb", "512", "--out-json", str(out_json), "--out-png",
                      str(tmp_path / "ar.png")])
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert result["model"] == "preset:smollm2-135m" and result["hf"] is None
    assert result["dtype"] == "float32" and result["jaxspec"]["new_tokens"] == 4
    assert result["bandwidth_gb_s"]["device"]["best"] > 0 and "rated" not in result[
        "bandwidth_gb_s"]
    assert "floor (device)" in capsys.readouterr().out
