"""`scripts/benchmark.py --batches`: speculative decoding against plain decoding per batch size.

For each batch size B (the first B chat prompts of the bundled set, repeated when B is larger),
greedy, EOS ignored, in one run: plain decoding; the draft with its default γ (a loaded draft
head: its recorded γ for one prompt, γ chosen by measurement for a batch, jaxspec.tuning);
and the draft at each fixed γ of --gammas. The first call of the default-γ decoder at each size
is timed apart (it includes that size's profile, when one runs); then `repeats` rounds run
every configuration once each (noise hits them alike), and each configuration's best rate
counts. Speedups are ÷ plain decoding at the same batch size.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from jaxspec.bench_prompts import load_prompts
from jaxspec.bench_suite import tokenized
from jaxspec.validation import MAX_SPECULATIVE_TOKENS

CATEGORY = "chat"


def prompts_for(target, path: str, batch: int, max_new_tokens: int) -> list[list[int]]:
    """The first `batch` chat prompts of the file as token ids (cycled when there are fewer),
    cut to what the target's positions leave room for at any γ."""
    chat = [p for p in load_prompts(path) if p.category == CATEGORY]
    return tokenized(target, [chat[i % len(chat)] for i in range(batch)], max_new_tokens,
                     MAX_SPECULATIVE_TOKENS, [])


def run(target, draft: str | None, *, prompts_path: str, batch_sizes: list[int],
        gammas: list[int], max_new_tokens: int, repeats: int, progress: Callable) -> dict:
    """Every measurement (see the module docstring) as a JSON-able dict."""
    from jaxspec import SpeculativeDecoder

    decoders = {"plain": SpeculativeDecoder(target, None),
                "default": SpeculativeDecoder(target, draft)}
    decoders.update({f"gamma{g}": SpeculativeDecoder(target, draft, num_speculative_tokens=g)
                     for g in gammas})
    rows = []
    for batch in progress(batch_sizes):
        prompts = prompts_for(target, prompts_path, batch, max_new_tokens)
        start = time.perf_counter()
        decoders["default"].generate(prompts, max_new_tokens=max_new_tokens)
        first = time.perf_counter() - start
        outputs = {name: d.generate(prompts, max_new_tokens=max_new_tokens)
                   for name, d in decoders.items()}  # untimed: compiles
        rates = {name: [] for name in decoders}
        for _ in range(repeats):
            for name, d in decoders.items():
                rates[name].append(d.generate(prompts, max_new_tokens=max_new_tokens)
                                   .stats["tokens_per_second"])
        best = {name: max(r) for name, r in rates.items()}
        choice = decoders["default"].gamma_choice
        rows.append({
            "batch": batch, "tok_s": best, "all_tok_s": rates,
            "speedup": {name: r / best["plain"] for name, r in best.items()},
            "default_gamma": decoders["default"].gamma,
            "default_gamma_source": choice.source if choice else "fixed",
            "first_call_s": first,
            "same_tokens": all(o.tokens == outputs["plain"].tokens for o in outputs.values()),
        })
    return {"draft": draft, "gammas": gammas, "new_tokens": max_new_tokens, "rows": rows}


def print_table(r: dict) -> None:
    fixed = [f"gamma{g}" for g in r["gammas"]]
    print(f"draft {r['draft']}, {r['new_tokens']} new tokens per prompt, greedy, EOS ignored; "
          "tok/s (speedup over plain decoding at the same batch size)\n")
    print("| prompts | plain | default γ | " + " | ".join(f"γ = {g}" for g in r["gammas"])
          + " | first call s | same tokens |")
    print("|---|---|---|" + "---|" * len(fixed) + "---|---|")
    for row in r["rows"]:
        rate = lambda name: f"{row['tok_s'][name]:.1f} ({row['speedup'][name]:.2f}×)"  # noqa: E731
        print(f"| {row['batch']} | {row['tok_s']['plain']:.1f} | {rate('default')} γ "
              f"{row['default_gamma']} ({row['default_gamma_source']}) | "
              + " | ".join(rate(name) for name in fixed)
              + f" | {row['first_call_s']:.1f} | {row['same_tokens']} |")


def plot(r: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    batches = [row["batch"] for row in r["rows"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name in ["default"] + [f"gamma{g}" for g in r["gammas"]]:
        label = "default γ" if name == "default" else f"γ = {name[5:]}"
        ax.plot(batches, [row["speedup"][name] for row in r["rows"]], marker="o", label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompts in the batch")
    ax.set_ylabel("speedup over plain decoding")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
