"""Benchmark jaxspec's decoding speed on the default model (greedy, batch 1).

    python scripts/benchmark.py --ar    # bandwidth floor, jaxspec vs Hugging Face transformers
    python scripts/benchmark.py --spec  [--gammas 1,2,3,4,6,8] [--draft layerskip:8]
    python scripts/benchmark.py --suite [--categories code,chat] [--prompts-per-category 2]
                                        [--drafts ngram,layerskip:8] [--draft PATH] [--no-hf]
    python scripts/benchmark.py --kernel [--gammas 1,2,4,8]
    python scripts/benchmark.py --stream [--draft none]
    python scripts/benchmark.py --startup [--repeats 5]
    python scripts/benchmark.py --batches [--batch-sizes 1,2,4,8] [--gammas 2] [--draft PATH]
    python scripts/benchmark.py --prefill [--prompt-tokens 100,400,900]
    python scripts/benchmark.py --ar|--spec|--exactness --preset llama3-8b [--device gpu]

--ar measures in one run the copy bandwidth, jaxspec's plain decode and transformers'
`generate` on the same fp32 weights and prompt, and checks the two greedy outputs match.
--spec measures plain and speculative decoding per γ, the cost ratios c (draft step ÷ decode
step) and v (verify on γ+1 tokens ÷ decode step), and compares the measured speedup with
mean_accepted_length / (γ·c + v). EOS is ignored on every side, so every run produces exactly
--max-new-tokens tokens. Speeds are compared as ratios within the run (the machine is shared);
PASS/FAIL lines are measurements, the exit status is 0 either way.
--suite measures all of it side by side over a prompt set in categories (jaxspec.bench_suite):
the bandwidth floor, plain decoding, every draft at every γ, transformers greedy and assisted
generation; it prints Markdown tables and writes a JSON file and two plots.
--kernel measures the CPU matmul kernel on and off in one run (jaxspec.bench_kernel): plain
decoding, prefill and a forward step on 1 and γ + 1 tokens, v = step time ÷ 1-token step time.
--stream measures the CLI's streamed decoding (its loop mode and chunk size, each chunk decoded
and written through its TextStream) against the library's non-streaming dynamic loop, same
prompt and draft (default: the CLI's default draft), runs interleaved.
--startup measures whole CLI processes on the default model (jaxspec.bench_startup): the first
one in a fresh cache, then warm ones with jaxspec's program cache and with JAX's compilation
cache only, alternating.
--preset NAME replaces the model by random weights of a real shape made on the device
(jaxspec.presets; bf16 unless --dtype float32), for --ar, --spec and --exactness: speed and
cost, not acceptance (its default draft is `self`, the target drafting for itself, which
accepts everything). On an accelerator --ar also measures the device's copy bandwidth and,
for a known device, compares with its rated bandwidth.
--batches measures speculative decoding against plain decoding per batch size, the draft at
its default γ (chosen by measurement for a batch) and at fixed γ (jaxspec.bench_batches).
--prefill measures time to first token on prompts of --prompt-tokens random ids, jaxspec
against transformers (jaxspec.bench_prefill).
--exactness compares greedy speculative output with greedy plain output, token for token, on
--repeats random prompts at each γ (batch 1): the mismatch rate, and where the first mismatch
fell (bf16 verifies and one-token steps may round differently on some backends).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys

from tqdm import tqdm

from jaxspec import (bench, bench_batches, bench_exactness, bench_kernel, bench_prefill,
                     bench_startup, bench_suite, presets, tuning)
from jaxspec.decode.sizing import loop_max_len
from jaxspec.errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PROMPT = "Write a short story about a robot learning to paint."
FLOOR_TARGET, HF_TARGET, PREDICTION_TARGET, STREAM_TARGET = 0.85, 2.5, 0.9, 0.95
WARM_START_TARGET, COLD_START_TARGET = 3.0, 10.0  # seconds of wall time (--startup)
# --ar --preset on a device of known rated bandwidth: (what is compared, target)
PRESET_TARGETS = {"llama3-8b": ("fraction_of_rated", 0.8),
                  "llama3.2-1b": ("fraction_of_rated", 0.6), "smollm2-135m": ("tok_s", 2500.0)}
EXACTNESS_PROMPT_TOKENS = 32
SUITE_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts", "suite.jsonl")
# per mode: (--ar/--spec, --suite, --kernel, --stream, --startup, --exactness, --batches,
# --prefill)
MODE_DEFAULTS = {"draft": ("layerskip:8", None, None, "default", None, "layerskip:8",
                           "default", None),
                 "gammas": ("1,2,3,4,6,8", bench_suite.DEFAULT_GAMMAS, "1,2,4,8", "1", "1",
                            "2,4", "2", "1"),
                 "max_new_tokens": (128, bench_suite.DEFAULT_MAX_NEW_TOKENS, 128, 128, 128, 128,
                                    96, 1),
                 "repeats": (3, 1, 5, 5, 5, 4, 2, 3),
                 "prompt": (DEFAULT_PROMPT,) * 4 + (bench_startup.PROMPT, DEFAULT_PROMPT,
                                                    DEFAULT_PROMPT, DEFAULT_PROMPT),
                 "out_json": ("bench.json", "bench_suite.json", "bench_kernel.json",
                              "bench_stream.json", "bench_startup.json", "bench_exactness.json",
                              "bench_batches.json", "bench_prefill.json"),
                 "out_png": ("bench.png", "bench_suite.png", "bench_kernel.png",
                             "bench_stream.png", "bench_startup.png", "bench_exactness.png",
                             "bench_batches.png", "bench_prefill.png")}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"benchmark: error: {message}\n")


def parse_args(argv):
    p = _Parser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--ar", action="store_true", help="plain decoding vs floor and transformers")
    mode.add_argument("--spec", action="store_true", help="speculative decoding per γ")
    mode.add_argument("--suite", action="store_true",
                      help="everything side by side over a prompt set in categories")
    mode.add_argument("--kernel", action="store_true",
                      help="the CPU matmul kernel on and off: plain decoding, prefill, v per "
                      "tokens per step")
    mode.add_argument("--stream", action="store_true",
                      help="the CLI's streamed decoding vs the library's non-streaming rate")
    mode.add_argument("--exactness", action="store_true",
                      help="greedy speculative vs plain output, token for token, per γ")
    mode.add_argument("--batches", action="store_true",
                      help="speculative vs plain decoding per batch size (--batch-sizes)")
    mode.add_argument("--prefill", action="store_true",
                      help="time to first token on long prompts, jaxspec vs transformers")
    mode.add_argument("--startup", action="store_true",
                      help="wall time of whole CLI processes: first, warm, warm with JAX's "
                      "compilation cache only")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"{DEFAULT_MODEL!r} (default), a .gguf file or a checkpoint directory")
    p.add_argument("--random", action="store_true",
                   help="random weights of SmolLM2-135M's shape instead of --model")
    p.add_argument("--preset", choices=sorted(presets.PRESETS),
                   help="random weights of a real shape, made on the device (--ar, --spec, "
                   "--exactness)")
    p.add_argument("--dtype", choices=presets.DTYPES, help="a preset's dtype (default bfloat16)")
    p.add_argument("--device", help="auto, cpu, gpu or neuron: where a preset lives and runs")
    p.add_argument("--draft", help="layerskip:K, ngram[:N] (c taken as 0), a checkpoint path "
                   "or model name (default layerskip:8; --suite: a model draft to add, none)")
    p.add_argument("--gammas", help="comma-separated γ values (default 1,2,3,4,6,8; --suite "
                   "1,...,8)")
    p.add_argument("--prompt", help="user message (chat-templated; default: a short story "
                   "request, --startup: the capital of France)")
    p.add_argument("--max-new-tokens", type=int, help="default 128 (--suite 64)")
    p.add_argument("--repeats", type=int, help="timed runs per configuration (default 3; "
                   "--suite: per prompt, 1)")
    p.add_argument("--cost-steps", type=int, default=16, help="forwards per cost measurement")
    p.add_argument("--batch-sizes", help="--batches: comma-separated prompts per batch "
                   "(default 1,2,4,8)")
    p.add_argument("--prompt-tokens", help="--prefill: comma-separated prompt lengths "
                   f"(default {bench_prefill.DEFAULT_LENGTHS})")
    p.add_argument("--copy-mb", type=int, default=1024, help="size of the copy (≥ 512 MB)")
    p.add_argument("--out-json", help="default bench.json (--suite bench_suite.json)")
    p.add_argument("--out-png", help="default bench.png (--suite bench_suite.png, which names "
                   "bench_suite_speedup.png and bench_suite_acceptance.png)")
    bench_suite.add_arguments(p)
    args = p.parse_args(argv)
    if args.preset and args.draft is None:
        args.draft = "self"  # acceptance of other drafts means nothing on random weights
    column = (2 if args.kernel else 3 if args.stream else 4 if args.startup
              else 5 if args.exactness else 6 if args.batches else 7 if args.prefill
              else int(args.suite))
    for name, defaults in MODE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, defaults[column])
    try:
        args.gammas = sorted({int(g) for g in args.gammas.split(",")})
    except ValueError:
        p.error(f"--gammas must be comma-separated integers, got {args.gammas!r}")
    if args.gammas[0] < 1 or args.gammas[-1] > 32:
        p.error("every γ must be in 1..32")
    for name in ("max_new_tokens", "repeats", "cost_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.copy_mb < 512:
        p.error("--copy-mb must be >= 512")
    if args.batch_sizes is not None and not args.batches:
        p.error("--batch-sizes needs --batches")
    try:
        args.batch_sizes = sorted({int(b) for b in (args.batch_sizes or "1,2,4,8").split(",")})
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if args.batch_sizes[0] < 1:
        p.error("every batch size must be >= 1")
    if args.prompt_tokens is not None and not args.prefill:
        p.error("--prompt-tokens needs --prefill")
    try:
        args.prompt_tokens = [int(n) for n in
                              (args.prompt_tokens or bench_prefill.DEFAULT_LENGTHS).split(",")]
    except ValueError:
        p.error(f"--prompt-tokens must be comma-separated integers, got {args.prompt_tokens!r}")
    if min(args.prompt_tokens) < 1:
        p.error("every prompt length must be >= 1")
    if (args.preset or args.dtype or args.device) and not (args.ar or args.spec
                                                           or args.exactness):
        p.error("--preset, --dtype and --device go with --ar, --spec or --exactness")
    if (args.dtype or args.device) and not args.preset:
        p.error("--dtype and --device need --preset")
    if args.preset and args.random:
        p.error("--preset and --random are two kinds of random weights: give one")
    if not args.suite:
        given = [n for n in bench_suite.SUITE_ONLY if getattr(args, n) is not None]
        if given or args.no_hf:
            p.error(f"--{(given or ['no_hf'])[0].replace('_', '-')} needs --suite")
    elif message := bench_suite.resolve_args(args, SUITE_PROMPTS):
        p.error(message)
    return args


def log(message: str) -> None:
    print(f"[benchmark] {message}", file=sys.stderr, flush=True)


def progress(desc: str):
    return lambda items: tqdm(items, desc=desc, file=sys.stderr, leave=False, disable=None)


# ---------------------------------------------------------------------------- models


def load_target(args, stack: contextlib.ExitStack):
    """(target model, source for transformers or None)."""
    if args.preset:
        import jax

        log(f"making preset {args.preset} ({args.dtype or 'bfloat16'}) on the device")
        target = presets.random_model(args.preset, dtype=args.dtype or "bfloat16",
                                      device=args.device)
        device = next(iter(target.params["embed"].devices()))
        jax.config.update("jax_default_device", device)  # the decoders compile for it
        return target, None
    return bench.load_target(args.model, random=args.random, stack=stack, log=log)


def load_draft(spec: str, target):
    """A checkpoint path or model name is loaded once for all γ; `self` is the target itself;
    layerskip:K, ngram, draft heads and DRAFT+ngram pass."""
    if spec == "self":
        return target
    if bench.model_draft_source(spec) is None:
        return spec
    from jaxspec.checkpoint.load import load_model

    return bench.without_eos(load_model(spec, dtype=target.params["embed"].dtype.name))


# ---------------------------------------------------------------------------- --ar


def ar_mode(args, target, hf_source, eos_ids) -> dict:
    from jaxspec import SpeculativeDecoder

    log("copy bandwidth")
    nbytes = args.copy_mb << 20
    bw = {"1_thread": bench.copy_bandwidth(nbytes, repeats=5, threads=1),
          "all_cores": bench.copy_bandwidth(nbytes, repeats=5, threads=os.cpu_count() or 1)}
    prompt = bench.prompt_ids(target, args.prompt)
    n = args.max_new_tokens
    decoder = SpeculativeDecoder(target, None)
    log("jaxspec: compile + warm-up")
    _, stats = bench.run_jaxspec(decoder, prompt, max_new_tokens=n)
    runs = [bench.run_jaxspec(decoder, prompt, max_new_tokens=n)
            for _ in progress("jaxspec generate")(range(args.repeats))]
    tokens = runs[0][0]
    max_len = loop_max_len(len(prompt), n, 0)
    prefill = bench.prefill_seconds(target, len(prompt), max_len, repeats=args.repeats)
    log("jaxspec: single decode step (fori_loop and host loop)")
    position = min(len(prompt) + n // 2, max_len - 1)
    steps = bench.interleaved({
        "fori_loop": bench.StepTimer(target, width=1, max_len=max_len, position=position,
                                     steps=args.cost_steps),
        "host_loop": bench.SingleStep(target, max_len=max_len, position=position,
                                      steps=args.cost_steps),
    }, args.repeats, progress("decode step"))
    steps = {k: bench.best_median(v, larger_is_better=False) for k, v in steps.items()}
    walls = [s["wall_seconds"] for _, s in runs]
    jax_result = {
        "new_tokens": len(tokens), "compile_seconds": stats["compile_seconds"],
        "tok_s": bench.best_median([len(tokens) / w for w in walls]),
        "prefill_seconds": prefill,
        "decode_tok_s_excl_prefill": bench.best_median([(len(tokens) - 1) / (w - prefill)
                                                        for w in walls]),
        "step_tok_s": {k: 1 / v["best"] for k, v in steps.items()},
        "all_runs_identical": all(t == tokens for t, _ in runs),
    }
    if args.preset:  # an array on the preset's device, and the device's rated bandwidth
        device = next(iter(target.params["embed"].devices()))
        log(f"copy bandwidth on {device.device_kind}")
        bw["device"] = bench.device_copy_bandwidth(device, nbytes)
        rated = bench.rated_bandwidth(device)
        if rated:
            bw["rated"] = {"best": rated, "median": rated, "device_kind": device.device_kind}
    result = {"jaxspec": jax_result, "bandwidth_gb_s": bw,
              "weight_bytes_per_token": bench.weight_bytes_per_token(target),
              "kv_bytes_per_step": bench.kv_bytes_per_step(
                  target.config, max_len, target.params["embed"].dtype.itemsize),
              "prompt_tokens": len(prompt), "max_new_tokens": n,
              "dtype": str(target.params["embed"].dtype)}
    result["floor_tok_s"] = {k: v["best"] * 1e9 / result["weight_bytes_per_token"]
                             for k, v in bw.items()}
    result["eos_at"] = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
    result["hf"] = hf_part(args, hf_source, prompt, tokens) if hf_source else None
    best = jax_result["tok_s"]["best"]
    result["fraction_of_floor"] = {k: best / f for k, f in result["floor_tok_s"].items()}
    result["targets"] = {
        "floor": {"target": FLOOR_TARGET, "value": result["fraction_of_floor"]["1_thread"]},
    }
    if "rated" in bw and args.preset in PRESET_TARGETS:  # an accelerator's targets
        kind, value = PRESET_TARGETS[args.preset]
        measured = result["fraction_of_floor"]["rated"] if kind == "fraction_of_rated" else best
        result["targets"] = {kind: {"target": value, "value": measured}}
    if result["hf"]:
        result["vs_hf"] = best / result["hf"]["tok_s"]["best"]
        result["targets"]["vs_hf"] = {"target": HF_TARGET, "value": result["vs_hf"]}
    for t in result["targets"].values():
        t["pass"] = t["value"] >= t["target"]
    return result


def hf_part(args, source, prompt, jax_tokens) -> dict:
    log(f"transformers: loading {os.path.basename(source)}")
    hf = bench.load_hf(source)
    log("transformers: warm-up")
    bench.run_hf(hf, prompt, max_new_tokens=args.max_new_tokens)
    runs = [bench.run_hf(hf, prompt, max_new_tokens=args.max_new_tokens)
            for _ in progress("transformers generate")(range(args.repeats))]
    tokens = runs[0][0]
    mismatch = next((i for i, (a, b) in enumerate(zip(tokens, jax_tokens)) if a != b), None)
    return {"new_tokens": len(tokens), "tok_s": bench.best_median([len(t) / s for t, s in runs]),
            "tokens_identical": tokens == jax_tokens, "first_mismatch": mismatch}


def print_ar(r: dict) -> None:
    j, bw, floor = r["jaxspec"], r["bandwidth_gb_s"], r["floor_tok_s"]
    print(f"prompt {r['prompt_tokens']} tokens, {j['new_tokens']} new tokens, greedy, "
          f"{r['dtype']}, batch 1 (first EOS in output: {r['eos_at']})")
    print(f"copy bandwidth   1 thread {bw['1_thread']['best']:6.1f} GB/s (median "
          f"{bw['1_thread']['median']:.1f})   all cores {bw['all_cores']['best']:6.1f} GB/s")
    print(f"weights read per token {r['weight_bytes_per_token'] / 1e6:.1f} MB "
          f"(+ KV cache {r['kv_bytes_per_step'] / 1e6:.1f} MB)")
    print(f"{'':34}{'best':>9}{'median':>9}  tok/s")
    for key, name in (("device", f"on the device {bw.get('device', {}).get('best', 0):.0f} "
                                 "GB/s"),
                      ("rated", f"rated {bw.get('rated', {}).get('best', 0):.0f} GB/s")):
        if key in bw:
            print(f"bandwidth {name}")
    print(f"{'floor (1-thread copy)':34}{floor['1_thread']:9.1f}")
    print(f"{'floor (all-core copy)':34}{floor['all_cores']:9.1f}")
    for key in ("device", "rated"):
        if key in floor:
            print(f"{'floor (' + key + ')':34}{floor[key]:9.1f}")

    def row(name, d):
        print(f"{name:34}{d['best']:9.1f}{d['median']:9.1f}")

    row("jaxspec generate (incl. prefill)", j["tok_s"])
    row("jaxspec decode only (excl. prefill)", j["decode_tok_s_excl_prefill"])
    for k, v in j["step_tok_s"].items():
        print(f"{'jaxspec one step, ' + k.replace('_', ' '):34}{v:9.1f}")
    if r["hf"]:
        row("transformers generate", r["hf"]["tok_s"])
    print(f"jaxspec prefill {j['prefill_seconds'] * 1e3:.0f} ms, compile "
          f"{j['compile_seconds']:.1f} s; repeated runs identical: {j['all_runs_identical']}")
    f = r["fraction_of_floor"]
    extra = "".join(f", {f[k]:.0%} ({k})" for k in ("device", "rated") if k in f)
    print(f"jaxspec / floor: {f['1_thread']:.0%} (1-thread copy), {f['all_cores']:.0%} "
          f"(all-core copy){extra}")
    if r["hf"]:
        h = r["hf"]
        print(f"jaxspec / transformers: {r['vs_hf']:.2f}x; tokens identical: "
              f"{h['tokens_identical']} (first mismatch: {h['first_mismatch']})")
    else:
        print("transformers: skipped (no GGUF or Hugging Face source for this model)")
    for name, t in r["targets"].items():
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {name}: {t['value']:.3f} (target >= "
              f"{t['target']})")


def plot_ar(r: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    j = r["jaxspec"]
    bars = {"floor\n(1-thread copy)": r["floor_tok_s"]["1_thread"],
            "floor\n(all-core copy)": r["floor_tok_s"]["all_cores"],
            "jaxspec": j["tok_s"]["best"], "jaxspec\ndecode only": j["decode_tok_s_excl_prefill"]
            ["best"]}
    if r["hf"]:
        bars["transformers"] = r["hf"]["tok_s"]["best"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(list(bars), list(bars.values()), color=["#bbb", "#ddd", "C0", "C9", "C1"][:len(bars)])
    ax.axhline(FLOOR_TARGET * r["floor_tok_s"]["1_thread"], ls="--", c="k", lw=1,
               label=f"{FLOOR_TARGET:.0%} of floor (1-thread)")
    ax.set_ylabel("tokens / s (best of repeats)")
    ax.set_title(f"greedy decode, {j['new_tokens']} tokens, fp32, batch 1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------- --spec


def spec_mode(args, target) -> dict:
    from jaxspec import SpeculativeDecoder

    prompt, n = bench.prompt_ids(target, args.prompt), args.max_new_tokens
    draft = load_draft(args.draft, target)
    decoders = {0: SpeculativeDecoder(target, None)}
    decoders.update({g: SpeculativeDecoder(target, draft, num_speculative_tokens=g)
                     for g in args.gammas})
    log(f"compile + warm-up of {len(decoders)} decoders")
    for d in progress("compile")(decoders.values()):
        bench.run_jaxspec(d, prompt, max_new_tokens=n)
    timers = step_timers(args, target, decoders[args.gammas[0]].draft_cost_source, len(prompt))
    calls = {g: functools.partial(bench.run_jaxspec, d, prompt, max_new_tokens=n)
             for g, d in decoders.items()}
    # one round = every decoder, then every step timer: noise hits all of them alike
    seen = bench.interleaved({**calls, **timers}, args.repeats, progress("rounds"))
    runs = {g: seen[g] for g in decoders}
    costs = {k: bench.best_median(seen[k], larger_is_better=False) for k in timers}
    ar_tokens = runs[0][0][0]
    ar = bench.best_median([s["tokens_per_second"] for _, s in runs[0]])
    rows = [spec_row(g, runs[g], ar, ar_tokens, costs, len(prompt), n) for g in args.gammas]
    return {"draft": args.draft, "prompt_tokens": len(prompt), "max_new_tokens": n,
            "ar_tok_s": ar, "step_seconds": costs, "rows": rows,
            "all_pass": all(r["pass"] for r in rows)}


def step_timers(args, target, draft, prompt_length: int) -> dict:
    """Timers (seconds per step) of decode/draft at each cache size the loops use and of
    verify per γ."""
    n = args.max_new_tokens
    timers = {}
    for g in progress("compile step timers")(args.gammas):
        max_len = loop_max_len(prompt_length, n, g)
        position = min(prompt_length + n // 2, max_len - g - 1)
        make = functools.partial(_timer, max_len=max_len, position=position,
                                 steps=args.cost_steps)
        where = dict(max_len=max_len, position=position, steps=args.cost_steps)
        if f"decode@{max_len}" not in timers:
            timers[f"decode@{max_len}"] = make(target, 1)
            if isinstance(draft, tuple):  # a draft head: a proposal step
                timers[f"draft@{max_len}"] = bench.HeadStepTimer(*draft, width=1, **where)
            elif draft is not None:  # a model draft's first forward per iteration reads 2 tokens
                timers[f"draft@{max_len}"] = make(draft, 1)
                timers[f"draft2@{max_len}"] = make(draft, 2, True)
        if isinstance(draft, tuple):  # and its observe (the γ + 1 verified entries and one)
            timers[f"observe{g}"] = bench.HeadStepTimer(*draft, width=draft[0].observed_entries(g),
                                                        observe=True, **where)
        timers[f"verify{g}"] = make(target, g + 1)
    return timers


def _timer(m, width, last_only=False, **kw):
    return bench.StepTimer(m, width=width, last_only=last_only, **kw)


def spec_row(g, runs, ar, ar_tokens, costs, prompt_length, n) -> dict:
    max_len = loop_max_len(prompt_length, n, g)
    decode = costs[f"decode@{max_len}"]["best"]
    draft, draft2 = costs.get(f"draft@{max_len}"), costs.get(f"draft2@{max_len}")
    observe = costs.get(f"observe{g}")  # a draft head's, once per iteration
    c = draft["best"] / decode if draft else 0.0  # a lookup draft runs no forward
    c += observe["best"] / (g * decode) if observe else 0.0
    c2 = draft2["best"] / decode if draft2 else c
    v = costs[f"verify{g}"]["best"] / decode
    stats = runs[0][1]
    spec = bench.best_median([s["tokens_per_second"] for _, s in runs])
    alpha, mal = stats["acceptance_rate"], stats["mean_accepted_length"]
    predicted = tuning.predicted_speedup(mal, g, c, v)
    measured = spec["best"] / ar["best"]
    return {"gamma": g, "acceptance_rate": alpha, "mean_accepted_length": mal,
            "iterations": stats["target_forward_calls"] - 1, "c": c, "c_first_2_tokens": c2,
            "v": v, "predicted_2_token_first": mal / (c2 + (g - 1) * c + v),
            "spec_tok_s": spec, "speedup": measured,
            "speedup_median": spec["median"] / ar["median"], "predicted": predicted,
            "predicted_iid": tuning.predicted_speedup(tuning.expected_tokens(alpha, g),
                                                     g, c, v),
            "measured_over_predicted": measured / predicted,
            "pass": measured / predicted >= PREDICTION_TARGET,
            "tokens_identical": all(t == ar_tokens for t, _ in runs)}


def print_spec(r: dict) -> None:
    ar = r["ar_tok_s"]
    print(f"draft {r['draft']}, prompt {r['prompt_tokens']} tokens, {r['max_new_tokens']} new "
          f"tokens, greedy; plain decoding {ar['best']:.1f} tok/s (median {ar['median']:.1f})")
    head = ("γ", "α", "tok/iter", "c", "v", "spec t/s", "speedup", "(median)", "predicted",
            "pred iid", "pred 2tok", "meas/pred", "same", "")
    print("".join(f"{h:>10}" for h in head))
    for x in r["rows"]:
        cells = (x["gamma"], f"{x['acceptance_rate']:.2f}", f"{x['mean_accepted_length']:.2f}",
                 f"{x['c']:.3f}", f"{x['v']:.3f}", f"{x['spec_tok_s']['best']:.1f}",
                 f"{x['speedup']:.2f}", f"{x['speedup_median']:.2f}", f"{x['predicted']:.2f}",
                 f"{x['predicted_iid']:.2f}", f"{x['predicted_2_token_first']:.2f}",
                 f"{x['measured_over_predicted']:.3f}",
                 "yes" if x["tokens_identical"] else "NO", "PASS" if x["pass"] else "FAIL")
        print("".join(f"{c:>10}" for c in cells))
    print("speedup = spec tok/s ÷ plain tok/s (best of repeats); predicted = tok/iter ÷ "
          "(γ·c + v); pred iid uses (1 − α^(γ+1)) / (1 − α);\npred 2tok = tok/iter ÷ "
          "(c₂ + (γ−1)·c + v), c₂ = the draft's first forward of each iteration (2 tokens)")
    print(f"speculative tokens == plain tokens for every γ: "
          f"{all(x['tokens_identical'] for x in r['rows'])}")
    print(f"{'PASS' if r['all_pass'] else 'FAIL'}  measured / predicted >= {PREDICTION_TARGET} "
          "for every γ")


def plot_spec(r: dict, path: str) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    rows = r["rows"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x - 0.2, [w["speedup"] for w in rows], 0.4, label="measured")
    ax.bar(x + 0.2, [w["predicted"] for w in rows], 0.4, label="predicted (measured tok/iter)")
    ax.plot(x + 0.2, [w["predicted_iid"] for w in rows], "k_", ms=16, label="predicted (i.i.d. α)")
    ax.axhline(1.0, c="gray", lw=1)
    ax.set_xticks(x, [f"γ={w['gamma']}" for w in rows])
    ax.set_ylabel("speedup over plain decoding")
    ax.set_title(f"speculative decoding, draft {r['draft']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------- --kernel


def kernel_mode(args, target) -> dict:
    from jaxspec.kernels import cpu_matmul

    if not cpu_matmul.available():
        raise UserError("--kernel: the CPU matmul kernel is unavailable on this machine")
    log("compile + warm-up, both layouts")
    return bench_kernel.run(target, bench.prompt_ids(target, args.prompt), gammas=args.gammas,
                            max_new_tokens=args.max_new_tokens, steps=args.cost_steps,
                            repeats=args.repeats, progress=progress("rounds"))


def prefill_mode(args, target, hf_source) -> dict:
    limit = target.config.max_position_embeddings
    if max(args.prompt_tokens) >= limit:
        raise UserError(f"--prompt-tokens: the model takes at most {limit - 1} prompt tokens "
                        "here (one position for the new token)")
    hf = None
    if hf_source:
        log(f"transformers: loading {os.path.basename(hf_source)}")
        hf = bench.load_hf(hf_source)
    log("per prompt length: compile + warm-up, then rounds")
    return bench_prefill.run(target, hf, args.prompt_tokens, repeats=args.repeats,
                             progress=progress("prompt lengths"))


def batches_mode(args, target) -> dict:
    draft = None if args.draft == "none" else args.draft
    return bench_batches.run(target, draft, prompts_path=SUITE_PROMPTS,
                             batch_sizes=args.batch_sizes, gammas=args.gammas,
                             max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                             progress=progress("batch sizes"))


# ---------------------------------------------------------------------------- --stream


def stream_mode(args, target) -> dict:
    from jaxspec import SpeculativeDecoder
    from jaxspec import generate as cli

    prompt = bench.prompt_ids(target, args.prompt)
    n, draft = args.max_new_tokens, None if args.draft == "none" else args.draft
    library = SpeculativeDecoder(target, draft)
    streaming = SpeculativeDecoder(target, draft, **cli.streaming(library.device))

    def streamed():
        with open(os.devnull, "w", encoding="utf-8") as sink:
            stream = cli.TextStream(target.tokenizer, (), sink)
            out = streaming.generate([prompt], max_new_tokens=n,
                                     on_update=lambda rows: stream.update(rows[0]))
            stream.update(out.tokens[0], final=True)
        return out

    runners = {"library": lambda: library.generate([prompt], max_new_tokens=n),
               "cli_stream": streamed}
    log("compile + warm-up, both paths")
    first = {name: run() for name, run in runners.items()}
    rates = {name: [] for name in runners}
    for _ in progress("rounds")(range(args.repeats)):
        for name, run in runners.items():
            rates[name].append(run().stats["tokens_per_second"])
    rates = {name: bench.best_median(v) for name, v in rates.items()}
    ratio = rates["cli_stream"]["median"] / rates["library"]["median"]
    return {"rates_tok_s": rates, "draft": args.draft, "gamma": library.gamma,
            "loop_mode": streaming.mode, "static_iterations": streaming.static_iterations,
            "new_tokens": n,
            "same_tokens": first["library"].tokens == first["cli_stream"].tokens,
            "targets": {"stream_ratio": {"target": STREAM_TARGET, "value": ratio,
                                         "pass": ratio >= STREAM_TARGET}}}


def print_stream(r: dict) -> None:
    rates = r["rates_tok_s"]
    print(f"draft {r['draft']} (γ {r['gamma']}), {r['new_tokens']} tokens, "
          f"{r['loop_mode']} mode, {r['static_iterations']} iterations per chunk; "
          f"identical tokens: {r['same_tokens']}")
    print("| path | tok/s best | tok/s median |\n|---|---|---|")
    for name, v in rates.items():
        print(f"| {name} | {v['best']:.1f} | {v['median']:.1f} |")
    t = r["targets"]["stream_ratio"]
    print(f"{'PASS' if t['pass'] else 'FAIL'} streamed ÷ library (medians) {t['value']:.3f} "
          f"(target ≥ {t['target']})")


def plot_stream(r: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    names = list(r["rates_tok_s"])
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.bar(names, [r["rates_tok_s"][k]["median"] for k in names], color=["C0", "C1"])
    ax.set_ylabel("tok/s (median)")
    ax.set_title(f"streamed ÷ library = {r['targets']['stream_ratio']['value']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- --startup


def startup_mode(args) -> int:
    if args.random:
        print("benchmark: error: --startup runs the CLI, which takes --model, not --random",
              file=sys.stderr)
        return 2
    log("one cold process, then warm ones (each loads the model)")
    other = bench.OtherLoad()
    model = None if args.model == DEFAULT_MODEL else args.model
    result = bench_startup.run(args.prompt, args.repeats, model, progress("rounds"))
    rows = result["rows"]
    result["targets"] = {
        "warm": {"target": WARM_START_TARGET, "value": rows["warm"]["wall_s"],
                 "pass": rows["warm"]["wall_s"] <= WARM_START_TARGET},
        "cold": {"target": COLD_START_TARGET, "value": rows["cold"]["wall_s"],
                 "pass": rows["cold"]["wall_s"] <= COLD_START_TARGET}}
    result.update(mode="startup", model=args.model, cpus=os.cpu_count(),
                  other_processes_cpu_share=other.fraction())
    bench_startup.print_table(result)
    for name, t in result["targets"].items():
        print(f"{'PASS' if t['pass'] else 'FAIL'} {name} start {t['value']:.2f} s "
              f"(target ≤ {t['target']:.0f} s)")
    print(f"warm ÷ warm with JAX's cache only: "
          f"{rows['warm']['wall_s'] / rows['warm_xla']['wall_s']:.2f}")
    share = result["other_processes_cpu_share"]
    if share is not None:
        print(f"other processes used {share:.0%} of the {os.cpu_count()} CPUs during the run")
    with open(args.out_json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    bench_startup.plot(result, args.out_png)
    print(f"wrote {args.out_json} and {args.out_png}")
    return 0


# ---------------------------------------------------------------------------- --exactness


def exactness_mode(args, target) -> dict:
    prompts = bench_exactness.random_prompts(target.config.vocab_size, args.repeats,
                                             EXACTNESS_PROMPT_TOKENS)
    log(f"{len(prompts)} prompts, plain then each γ (compiles once per γ)")
    result = bench_exactness.run(target, load_draft(args.draft, target), args.gammas, prompts,
                                 args.max_new_tokens, progress("γ"))
    result["draft"] = args.draft
    return result


PRINT = {"ar": print_ar, "spec": print_spec, "kernel": bench_kernel.print_table,
         "stream": print_stream, "exactness": bench_exactness.print_table,
         "batches": bench_batches.print_table, "prefill": bench_prefill.print_table}
PLOT = {"ar": plot_ar, "spec": plot_spec, "kernel": bench_kernel.plot, "stream": plot_stream,
        "exactness": bench_exactness.plot, "batches": bench_batches.plot,
        "prefill": bench_prefill.plot}


# ---------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    if args.suite:
        try:
            return bench_suite.main(args, log)
        except UserError as e:
            print(f"benchmark: error: {e}", file=sys.stderr)
            return 2
    if args.startup:
        return startup_mode(args)
    try:
        with contextlib.ExitStack() as stack:
            target, hf_source = load_target(args, stack)
            eos_ids = set(target.config.eos_token_ids)
            target = bench.without_eos(target)  # every run makes exactly --max-new-tokens
            other = bench.OtherLoad()
            mode = next(m for m in ("ar", "kernel", "stream", "exactness", "batches", "prefill",
                                    "spec") if getattr(args, m))
            result = (ar_mode(args, target, hf_source, eos_ids) if args.ar
                      else kernel_mode(args, target) if args.kernel
                      else stream_mode(args, target) if args.stream
                      else batches_mode(args, target) if args.batches
                      else prefill_mode(args, target, hf_source) if args.prefill
                      else exactness_mode(args, target) if args.exactness
                      else spec_mode(args, target))
    except UserError as e:
        print(f"benchmark: error: {e}", file=sys.stderr)
        return 2
    share = other.fraction()
    model = f"preset:{args.preset}" if args.preset else "random" if args.random else args.model
    result.update(mode=mode, model=model,
                  other_processes_cpu_share=share, cpus=os.cpu_count())
    PRINT[mode](result)
    if share is not None:
        print(f"other processes used {share:.0%} of the {os.cpu_count()} CPUs during the run"
              + ("; speeds are low and noisy, transformers (OpenMP) most" if share > 0.1 else ""))
    with open(args.out_json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    PLOT[mode](result, args.out_png)
    print(f"wrote {args.out_json} and {args.out_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
