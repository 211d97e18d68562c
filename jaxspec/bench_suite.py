"""The benchmark suite behind `scripts/benchmark.py --suite`.

In one run on one machine, on a set of prompts in categories (JSONL, `load_prompts`):

  hardware floor        copy and read bandwidth (1 thread, all cores) over the weight bytes
                        one decode step reads, as tokens/s
  jaxspec plain         SpeculativeDecoder(target, None), greedy, batch 1
  jaxspec speculative   every draft (ngram[:N], layerskip:K, a model checkpoint) at every γ
  transformers          greedy `generate`; prompt lookup (`prompt_lookup_num_tokens`) and, when
                        the model draft is something transformers can load, an assistant
                        model (`assistant_model`, a constant γ drafts per iteration)

Per configuration and category it reports tokens/s with compilation excluded (each
configuration's compile seconds reported apart), the acceptance rate α, the mean accepted
length (tokens per verify), the acceptance per draft position, the cost ratios c (draft step
÷ decode step; 0 for n-gram lookup) and v (verify of γ + 1 tokens ÷ decode step), the
predicted speedup mean_accepted_length / (γ·c + v) next to the measured one, and how much the
process's peak resident set size grew during the configuration's runs.

How it measures: EOS is ignored, so every run produces exactly max_new_tokens tokens. A
configuration first runs untimed (jaxspec: a short generation with the same compiled program,
once per prompt width; transformers: once), so compilation and first-run effects stay out of
the timings; then, prompt by prompt, every configuration runs `repeats` times back to back, so
that machine noise hits them alike. A category's tokens/s is its new tokens over the sum of
each prompt's best wall time (median too); speedups are ratios within the run, to the same
engine's plain decoding on the same prompts. c and v come from `bench.StepTimer` (best of 3
rounds) at the KV-cache size of the median prompt; the bandwidth is measured last, so its
large buffers do not mask the models' peak memory. The prompts in scripts/prompts/suite.jsonl
are 97–111 tokens long after SmolLM2's chat template, one prompt-width bucket, so each
configuration compiles once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from jaxspec import bench_report, tuning
from jaxspec.bench_prompts import (PeakRss, Prompt, encode, fit, load_prompts, machine_info,
                                   select_prompts)
from jaxspec.bench_report import ALL, draft_label
from jaxspec.errors import UserError

CATEGORIES = ("code", "extraction", "summarization", "chat")  # the bundled prompt set's
DEFAULT_DRAFTS = "ngram,layerskip:8"
DEFAULT_GAMMAS = "1,2,3,4,5,6,7,8"
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_PROMPTS_PER_CATEGORY = 2
HF_GAMMA_CHOICES = (2, 4, 8)  # transformers' assisted generation runs at these γ by default
TIMER_ROUNDS = 3  # rounds of the c and v timers (they are cheap)


# ---------------------------------------------------------------------------- arguments


def add_arguments(parser) -> None:
    """The suite's own options (the shared ones, e.g. --gammas and --draft, are the
    script's)."""
    g = parser.add_argument_group("--suite options")
    g.add_argument("--prompts", default=None, metavar="FILE",
                   help="JSONL, one {\"category\": ..., \"prompt\": ...} per line (default: "
                   "the bundled set, scripts/prompts/suite.jsonl)")
    g.add_argument("--categories", default=None,
                   help="comma-separated categories to run (default: all in the file)")
    g.add_argument("--prompts-per-category", type=int, default=None,
                   help=f"first N prompts of each category (default "
                   f"{DEFAULT_PROMPTS_PER_CATEGORY})")
    g.add_argument("--drafts", default=None,
                   help=f"comma-separated drafts (default {DEFAULT_DRAFTS}; --draft PATH adds "
                   "a model draft)")
    g.add_argument("--no-hf", action="store_true", help="skip transformers")
    g.add_argument("--hf-gammas", default=None,
                   help="γ values for transformers' assisted generation (default: those of "
                   f"--gammas among {','.join(map(str, HF_GAMMA_CHOICES))}, else the largest)")


SUITE_ONLY = ("prompts", "categories", "prompts_per_category", "drafts", "hf_gammas")


def resolve_args(args, default_prompts: str) -> str | None:
    """Fill the suite's defaults into args; an error message for bad values, else None."""
    args.prompts = args.prompts or default_prompts
    if args.prompts_per_category is None:
        args.prompts_per_category = DEFAULT_PROMPTS_PER_CATEGORY
    if args.prompts_per_category < 1:
        return "--prompts-per-category must be >= 1"
    args.categories = _split(args.categories) if args.categories else None
    drafts = _split(args.drafts if args.drafts is not None else DEFAULT_DRAFTS)
    if args.draft and args.draft not in drafts:
        drafts.append(args.draft)
    args.drafts = drafts
    try:
        hf = [int(x) for x in _split(args.hf_gammas)] if args.hf_gammas else None
    except ValueError:
        return f"--hf-gammas must be comma-separated integers, got {args.hf_gammas!r}"
    if hf is not None and (min(hf) < 1 or max(hf) > 32):
        return "every --hf-gammas value must be in 1..32"
    args.hf_gammas = sorted(set(hf or default_hf_gammas(args.gammas)))
    return None


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def default_hf_gammas(gammas: Sequence[int]) -> list[int]:
    """Those of the suite's γ among HF_GAMMA_CHOICES, else the largest γ."""
    return [g for g in gammas if g in HF_GAMMA_CHOICES] or [max(gammas)]


# ---------------------------------------------------------------------------- runners


def warmup_tokens(prompt_length: int, max_new_tokens: int, gamma: int) -> int:
    """The fewest new tokens whose loop has the same buffer size (hence compiled program) as
    max_new_tokens."""
    from jaxspec.decode.sizing import loop_max_len

    size = loop_max_len(prompt_length, max_new_tokens, gamma)
    return next(k for k in range(1, max_new_tokens + 1)
                if loop_max_len(prompt_length, k, gamma) == size)


@dataclasses.dataclass
class Run:
    tokens: list[int]
    seconds: float  # wall time of the generation, prefill included, compile excluded
    stats: dict | None  # jaxspec's generate statistics; None for transformers


class JaxspecRunner:
    """Greedy generation with one SpeculativeDecoder; compile seconds summed over widths."""

    def __init__(self, decoder, max_new_tokens: int):
        self.decoder, self.n = decoder, max_new_tokens
        self.compile_seconds, self._warm = 0.0, set()

    def warm(self, prompt: list[int]) -> None:
        from jaxspec import bench
        from jaxspec.decode.sizing import prompt_width

        if prompt_width(len(prompt)) in self._warm:
            return
        n = warmup_tokens(len(prompt), self.n, self.decoder.gamma)
        _, stats = bench.run_jaxspec(self.decoder, prompt, max_new_tokens=n)
        self.compile_seconds += stats["compile_seconds"]
        self._warm.add(prompt_width(len(prompt)))

    def __call__(self, prompt: list[int]) -> Run:
        from jaxspec import bench

        tokens, stats = bench.run_jaxspec(self.decoder, prompt, max_new_tokens=self.n)
        self.compile_seconds += stats["compile_seconds"]  # 0 unless warm() missed a shape
        return Run(tokens, stats["wall_seconds"], stats)


class HfRunner:
    """Greedy transformers `generate`, optionally assisted; its first call is a warm-up."""

    def __init__(self, hf, max_new_tokens: int, **assist):
        self.hf, self.n, self.assist = hf, max_new_tokens, assist
        self.warmup_seconds = None

    def warm(self, prompt: list[int]) -> None:
        from jaxspec import bench

        if self.warmup_seconds is None:
            _, self.warmup_seconds = bench.run_hf(self.hf, prompt, max_new_tokens=min(8, self.n),
                                                  **self.assist)

    def __call__(self, prompt: list[int]) -> Run:
        from jaxspec import bench

        tokens, seconds = bench.run_hf(self.hf, prompt, max_new_tokens=self.n, **self.assist)
        return Run(tokens, seconds, None)


@dataclasses.dataclass
class Config:
    name: str
    engine: str  # "jaxspec" or "transformers"
    draft: str | None  # jaxspec: the draft name; transformers: "prompt lookup", "assistant"
    gamma: int  # 0: plain decoding
    runner: JaxspecRunner | HfRunner
    runs: list[list[Run]] = dataclasses.field(default_factory=list)  # [prompt][repeat]


def jaxspec_configs(target, drafts: Sequence[str], gammas: Sequence[int],
                    max_new_tokens: int) -> list[Config]:
    """Plain decoding, then every draft at every γ (a model draft is loaded once)."""
    from jaxspec import SpeculativeDecoder

    configs = [Config("jaxspec plain", "jaxspec", None, 0,
                      JaxspecRunner(SpeculativeDecoder(target, None), max_new_tokens))]
    for name in drafts:
        draft = load_draft(name, target)
        for g in gammas:
            decoder = SpeculativeDecoder(target, draft, num_speculative_tokens=g)
            configs.append(Config(f"jaxspec {draft_label(name)} γ={g}", "jaxspec", name, g,
                                  JaxspecRunner(decoder, max_new_tokens)))
    return configs


def load_draft(name: str, target):
    """A model draft loaded once (target's dtype, EOS ignored); other names and draft-head
    checkpoints pass through."""
    from jaxspec import bench
    from jaxspec.checkpoint import names

    if bench.model_draft_source(name) is None:
        return name
    from jaxspec.checkpoint.load import load_model

    names.check_exists(name, "draft")
    return bench.without_eos(load_model(name, dtype=target.params["embed"].dtype.name))


def hf_configs(hf, assistant, gammas: Sequence[int], max_new_tokens: int,
               ngram: int) -> list[Config]:
    """transformers greedy, prompt lookup (longest n-gram `ngram`) and, with an assistant
    model, assisted generation, each at every γ in gammas."""
    configs = [Config("transformers greedy", "transformers", None, 0,
                      HfRunner(hf, max_new_tokens))]
    for g in gammas:
        configs.append(Config(f"transformers prompt lookup γ={g}", "transformers",
                              "prompt lookup", g,
                              HfRunner(hf, max_new_tokens, prompt_lookup_num_tokens=g,
                                       max_matching_ngram_size=ngram)))
    for g in gammas if assistant is not None else ():
        configs.append(Config(f"transformers assistant γ={g}", "transformers", "assistant", g,
                              HfRunner(hf, max_new_tokens, assistant_model=assistant,
                                       num_assistant_tokens=g,
                                       num_assistant_tokens_schedule="constant",
                                       assistant_confidence_threshold=0.0)))
    return configs


def measure_runs(configs: Sequence[Config], prompts: Sequence[list[int]], repeats: int,
                 rss: PeakRss, progress) -> None:
    """Per prompt: warm every configuration, then `repeats` rounds of all of them; fills
    config.runs[prompt][repeat]. progress(config name) is called after every timed run."""
    for config in configs:
        config.runs = [[] for _ in prompts]
    for i, prompt in enumerate(prompts):
        for config in configs:
            rss.call(config.name, config.runner.warm, prompt)
        for _ in range(repeats):
            for config in configs:
                config.runs[i].append(rss.call(config.name, config.runner, prompt))
                progress(config.name)


# ---------------------------------------------------------------------------- costs


def measure_costs(target, draft_models: dict[str, object], prompt_length: int,
                  max_new_tokens: int, gammas: Sequence[int], steps: int) -> dict:
    """c per draft and γ, v per γ, and the seconds behind them (best of TIMER_ROUNDS).

    draft_models: {draft name: its model, a draft head as (HeadDraft, its loop params), or
    None for a model-free draft (c = 0)}. A head's c counts its γ proposal steps and the
    observe of γ + 2 entries each iteration costs: c = (γ·step + observe) ÷ (γ·decode step).
    Each γ is timed at the KV-cache size its loop uses for a prompt of prompt_length tokens.
    """
    from jaxspec import bench
    from jaxspec.decode.sizing import loop_max_len

    timers, keys = {}, {}
    for g in gammas:
        max_len = loop_max_len(prompt_length, max_new_tokens, g)
        where = dict(max_len=max_len, steps=steps,
                     position=min(prompt_length + max_new_tokens // 2, max_len - g - 1))
        make = functools.partial(bench.StepTimer, **where)
        keys[g] = f"decode@{max_len}"
        timers.setdefault(keys[g], lambda make=make: make(target, width=1))
        timers[f"verify{g}"] = lambda make=make, g=g: make(target, width=g + 1)
        for name, model in draft_models.items():
            if isinstance(model, tuple):  # a draft head
                head = functools.partial(bench.HeadStepTimer, *model, **where)
                timers.setdefault(f"{name}@{max_len}", lambda h=head: h(width=1))
                width = model[0].observed_entries(g)
                timers[f"{name}-observe{g}"] = lambda h=head, w=width: h(width=w, observe=True)
            elif model is not None:
                timers.setdefault(f"{name}@{max_len}",
                                  lambda make=make, m=model: make(m, width=1, last_only=True))
    built = {k: build() for k, build in timers.items()}  # compiles; keeps the dict's order
    seconds = {k: min(v) for k, v in bench.interleaved(built, TIMER_ROUNDS).items()}
    decode = {g: seconds[keys[g]] for g in gammas}
    v = {g: seconds[f"verify{g}"] / decode[g] for g in gammas}

    def c_of(name, model, g):
        if model is None:
            return 0.0
        step = seconds[f"{name}@{keys[g].split('@')[1]}"]
        extra = seconds[f"{name}-observe{g}"] / g if isinstance(model, tuple) else 0.0
        return (step + extra) / decode[g]

    c = {name: {g: c_of(name, model, g) for g in gammas} for name, model in draft_models.items()}
    return {"seconds": seconds, "v": v, "c": c, "prompt_length": prompt_length}


# ---------------------------------------------------------------------------- summary


def category_summary(config: Config, indices: Sequence[int], plain: Config | None) -> dict:
    """Numbers of one configuration over the prompts at `indices`."""
    runs = [config.runs[i] for i in indices]
    tokens = sum(len(r[0].tokens) for r in runs)
    best = sum(min(x.seconds for x in r) for r in runs)
    median = sum(statistics.median(x.seconds for x in r) for r in runs)
    out = {"prompts": len(runs), "new_tokens": tokens, "seconds_best": best,
           "seconds_median": median, "tok_s": tokens / best, "tok_s_median": tokens / median}
    if plain is not None:
        out["identical_to_plain"] = sum(config.runs[i][0].tokens == plain.runs[i][0].tokens
                                        for i in indices)
    if config.gamma and runs[0][0].stats is not None:
        out.update(acceptance([r[0].stats for r in runs]))
    return out


def acceptance(stats: Sequence[dict]) -> dict:
    """α, tokens per verify and acceptance per position over several generations."""
    iterations = sum(s["target_forward_calls"] - 1 for s in stats)
    accepted = sum(s["draft_tokens_accepted"] for s in stats)
    proposed = sum(s["draft_tokens_proposed"] for s in stats)
    counts = [sum(col) for col in zip(*(s["accepted_per_position"] for s in stats))]
    return {"iterations": iterations, "draft_tokens_accepted": accepted,
            "acceptance_rate": accepted / proposed if proposed else 0.0,
            "mean_accepted_length": (accepted + iterations) / iterations if iterations else 0.0,
            "accepted_per_position_counts": counts,
            "accepted_per_position": [n / iterations if iterations else 0.0 for n in counts]}


def summarize(configs: Sequence[Config], prompts: Sequence[Prompt], costs: dict | None,
              rss: PeakRss) -> list[dict]:
    """Every configuration's numbers per category and over all prompts."""
    groups = {c: [i for i, p in enumerate(prompts) if p.category == c]
              for c in dict.fromkeys(p.category for p in prompts)}
    groups[ALL] = list(range(len(prompts)))
    plain = {c.engine: c for c in configs if c.gamma == 0}
    jax_plain = plain.get("jaxspec")
    rows = []
    for config in configs:
        cats = {name: category_summary(config, idx, jax_plain) for name, idx in groups.items()}
        row = {"name": config.name, "engine": config.engine, "draft": config.draft,
               "gamma": config.gamma, "peak_rss_growth_mib": rss.grown.get(config.name, 0) / 2**20,
               "categories": cats,
               "runs": [{"prompt_line": p.line, "category": p.category,
                         "seconds": [x.seconds for x in r], "new_tokens": len(r[0].tokens)}
                        for p, r in zip(prompts, config.runs)]}
        if config.engine == "jaxspec":
            row["compile_seconds"] = config.runner.compile_seconds
        else:
            row["warmup_seconds"] = config.runner.warmup_seconds
        if config.engine == "jaxspec" and config.gamma and costs:
            row["c"] = costs["c"][config.draft][config.gamma]
            row["v"] = costs["v"][config.gamma]
        add_speedups(row, plain.get(config.engine), jax_plain, groups)
        rows.append(row)
    return rows


def add_speedups(row: dict, own_plain: Config | None, jax_plain: Config | None,
                 groups: dict) -> None:
    """Per category: speedup over the same engine's plain decoding (best and median), over
    jaxspec plain, and for jaxspec drafts the predicted speedup tokens/verify ÷ (γ·c + v)."""
    for name, cat in row["categories"].items():
        if own_plain is not None:
            base = category_summary(own_plain, groups[name], None)
            cat["speedup"] = cat["tok_s"] / base["tok_s"]
            cat["speedup_median"] = cat["tok_s_median"] / base["tok_s_median"]
        if jax_plain is not None:
            cat["vs_jaxspec_plain"] = (cat["tok_s"] /
                                       category_summary(jax_plain, groups[name], None)["tok_s"])
        if "c" in row and "mean_accepted_length" in cat:
            cat["predicted_speedup"] = tuning.predicted_speedup(
                cat["mean_accepted_length"], row["gamma"], row["c"], row["v"])
            cat["measured_over_predicted"] = cat["speedup"] / cat["predicted_speedup"]


# ---------------------------------------------------------------------------- the run


def hardware_floor(target, nbytes: int, repeats: int) -> dict:
    """Copy and read bandwidth (1 thread, all cores) and the tokens/s they allow: bandwidth ÷
    the weight bytes one decode step reads (KV cache not counted)."""
    from jaxspec import bench

    cores = os.cpu_count() or 1
    bandwidth = {
        "copy_1_thread": bench.copy_bandwidth(nbytes, repeats=repeats, threads=1),
        "copy_all_cores": bench.copy_bandwidth(nbytes, repeats=repeats, threads=cores),
        "read_1_thread": bench.read_bandwidth(nbytes, repeats=repeats, threads=1),
        "read_all_cores": bench.read_bandwidth(nbytes, repeats=repeats, threads=cores),
    }
    weight_bytes = bench.weight_bytes_per_token(target)
    return {"bandwidth_gb_s": bandwidth, "weight_bytes_per_token": weight_bytes,
            "floor_tok_s": {k: v["best"] * 1e9 / weight_bytes for k, v in bandwidth.items()}}


def tokenized(target, prompts: Sequence[Prompt], max_new_tokens: int, max_gamma: int,
              draft_models: Sequence) -> list[list[int]]:
    """Every prompt's ids, cut to what the models' positions leave room for."""
    room = min(m.config.max_position_embeddings for m in [target, *draft_models])
    limit = room - max_new_tokens - max_gamma - 1
    if limit < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} with γ up to {max_gamma} leaves no "
                        f"room for a prompt within the model's {room} positions")
    return [fit(encode(target, p.text), limit) for p in prompts]


def run(args, log: Callable[[str], None]) -> dict:
    """Everything `--suite` measures, as one JSON-ready dict (args: the script's, resolved)."""
    from tqdm import tqdm

    from jaxspec import bench

    started = time.perf_counter()
    prompts = select_prompts(load_prompts(args.prompts), args.categories,
                             args.prompts_per_category)
    rss = PeakRss()
    with contextlib.ExitStack() as stack:
        target, hf_source = bench.load_target(args.model, random=args.random, stack=stack,
                                              log=log)
        eos_ids = list(target.config.eos_token_ids)
        target = bench.without_eos(target)
        other = bench.OtherLoad()
        configs = jaxspec_configs(target, args.drafts, args.gammas, args.max_new_tokens)
        draft_models = {name: next(c.runner.decoder for c in configs
                                   if c.draft == name).draft_cost_source for name in args.drafts}
        ids = tokenized(target, prompts, args.max_new_tokens, max(args.gammas),
                        [m for m in draft_models.values() if m is not None
                         and not isinstance(m, tuple)])
        if hf_source and not args.no_hf:
            configs += transformers_configs(args, hf_source, stack, log)
        log(f"{len(configs)} configurations × {len(prompts)} prompts × {args.repeats} repeats "
            "(plus untimed warm-ups that compile)")
        with tqdm(total=len(configs) * len(prompts) * args.repeats, desc="suite",
                  file=sys.stderr, disable=None) as bar:
            measure_runs(configs, ids, args.repeats, rss,
                         lambda name: (bar.set_postfix_str(name, refresh=False), bar.update()))
        log("cost ratios c and v")
        costs = measure_costs(target, draft_models, int(statistics.median(map(len, ids))),
                              args.max_new_tokens, args.gammas, args.cost_steps)
        rows = summarize(configs, prompts, costs, rss)
        peak_mib = PeakRss.now_bytes() / 2**20
        log("hardware floor: copy and read bandwidth")  # last: its buffers would mask the peak
        floor = hardware_floor(target, args.copy_mb << 20, repeats=5)
        share = other.fraction()
    return {
        "mode": "suite", "machine": machine_info(),
        "settings": settings(args, target, eos_ids, hf_source),
        "prompts": [{"category": p.category, "line": p.line, "prompt_tokens": len(i)}
                    for p, i in zip(prompts, ids)],
        "hardware": floor, "costs": costs_json(costs), "configs": rows,
        "peak_rss_mib": peak_mib,
        "other_processes_cpu_share": share, "elapsed_seconds": time.perf_counter() - started,
        "notes": NOTES,
    }


def transformers_configs(args, hf_source: str, stack: contextlib.ExitStack, log) -> list[Config]:
    """transformers' configurations; an assistant model for the first model draft it can load
    (a draft head is no model transformers can run)."""
    from jaxspec import bench
    from jaxspec.drafts import registry

    log(f"transformers: loading {os.path.basename(hf_source)}")
    hf = bench.load_hf(hf_source)
    assistant = None
    for name in args.drafts:
        if bench.model_draft_source(name) is not None:
            source = bench.hf_source_of(name, stack)
            if source is not None:
                log(f"transformers: loading the assistant {os.path.basename(source)}")
                assistant = bench.load_hf(source)
                break
    ngram = next((registry.parse(d).number for d in args.drafts
                  if registry.parse(d).kind == registry.NGRAM), registry.NGRAM_DEFAULT)
    return hf_configs(hf, assistant, args.hf_gammas, args.max_new_tokens, ngram)


def settings(args, target, eos_ids, hf_source) -> dict:
    return {
        "model": "random SmolLM2-135M-shaped weights" if args.random else args.model,
        "dtype": str(target.params["embed"].dtype), "eos_ids_ignored": eos_ids,
        "chat_template": bool(getattr(target.tokenizer, "chat_template", None)),
        "prompts_file": args.prompts, "categories": args.categories,
        "prompts_per_category": args.prompts_per_category,
        "max_new_tokens": args.max_new_tokens, "gammas": args.gammas, "drafts": args.drafts,
        "transformers": bool(hf_source) and not args.no_hf, "hf_gammas": args.hf_gammas,
        "repeats": args.repeats, "cost_steps": args.cost_steps, "copy_mb": args.copy_mb,
        "batch": 1, "sampling": "greedy",
    }


def costs_json(costs: dict) -> dict:
    return {"seconds_per_step": costs["seconds"], "prompt_length": costs["prompt_length"],
            "v": {str(g): x for g, x in costs["v"].items()},
            "c": {d: {str(g): x for g, x in per.items()} for d, per in costs["c"].items()}}


NOTES = {
    "tok_s": "new tokens ÷ the sum over prompts of each prompt's best wall time (prefill "
             "included, compilation excluded); tok_s_median uses each prompt's median",
    "speedup": "tok_s ÷ the same engine's plain decoding on the same prompts (jaxspec plain "
               "for jaxspec, transformers greedy for transformers)",
    "vs_jaxspec_plain": "tok_s ÷ jaxspec plain decoding's tok_s on the same prompts",
    "predicted_speedup": "mean_accepted_length ÷ (γ·c + v)",
    "c": "draft forward on 1 token ÷ target decode step (0 for n-gram lookup, which runs no "
         "forward)",
    "v": "target forward on γ + 1 tokens ÷ target decode step",
    "accepted_per_position": "fraction of verify iterations that accepted draft position i",
    "peak_rss_mib": "the process's peak resident set size before the bandwidth measurement",
    "peak_rss_growth_mib": "growth of the process's peak resident set size (getrusage "
                           "ru_maxrss) during the configuration's runs, warm-up and "
                           "compilation included; 0 when it stayed under an earlier peak",
    "compile_seconds": "jaxspec compilation (or loading from the persistent compilation "
                       "cache) of the configuration's programs",
    "warmup_seconds": "transformers' first (untimed) call, 8 new tokens at most",
    "floor_tok_s": "bandwidth ÷ weight bytes read per decode step (KV cache not counted); "
                   "copy bandwidth counts bytes read + written",
}


def main(args, log: Callable[[str], None]) -> int:
    """Run the suite; print the Markdown report, write the JSON and the plots."""
    result = run(args, log)
    print(bench_report.markdown(result))
    with open(args.out_json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    paths = bench_report.plot(result, os.path.splitext(args.out_png)[0])
    print(f"wrote {args.out_json}, {' and '.join(paths)} "
          f"({result['elapsed_seconds'] / 60:.1f} min)")
    return 0
