"""`scripts/benchmark.py --prefill`: time to first token on long prompts, jaxspec against
`transformers`, in one run.

For each prompt length, one greedy generation of a single new token on each side, in rounds
that interleave the two: jaxspec's `SpeculativeDecoder` (plain decoding; each length compiles
before the rounds, so compiling is excluded) and `transformers` `generate` on the same weights.
The prompts are random token ids (the time does not depend on which tokens they are). Reported
per length: seconds (best and median of the rounds), prompt tokens per second, jaxspec's time
÷ transformers' and whether the two first tokens agree.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from jaxspec import bench

DEFAULT_LENGTHS = "100,400,900"
TARGET = 1.0  # jaxspec's time to first token ÷ transformers', at every length


def run(target, hf, lengths: list[int], *, repeats: int, progress: Callable) -> dict:
    """Every measurement (see the module docstring); `hf` None measures jaxspec alone."""
    from jaxspec import SpeculativeDecoder

    decoder = SpeculativeDecoder(target, None)
    rng = np.random.default_rng(0)
    rows = {}
    for n in progress(lengths):
        prompt = rng.integers(3, target.config.vocab_size, n).tolist()

        def jaxspec_call(prompt=prompt):
            start = time.perf_counter()
            tokens, _ = bench.run_jaxspec(decoder, prompt, max_new_tokens=1)
            return tokens, time.perf_counter() - start

        calls = {"jaxspec": jaxspec_call}
        if hf is not None:
            calls["transformers"] = lambda prompt=prompt: bench.run_hf(hf, prompt,
                                                                       max_new_tokens=1)
        for call in calls.values():  # compile, warm up
            call()
        seen = bench.interleaved(calls, repeats)
        row = {name: bench.best_median([s for _, s in runs], larger_is_better=False)
               for name, runs in seen.items()}
        row["first_token"] = {name: runs[0][0][0] for name, runs in seen.items()}
        if hf is not None:
            row["ratio"] = row["jaxspec"]["best"] / row["transformers"]["best"]
            row["first_tokens_identical"] = len(set(row["first_token"].values())) == 1
        rows[n] = row
    result = {"lengths": rows}
    if hf is not None:
        worst = max(r["ratio"] for r in rows.values())
        result["targets"] = {"jaxspec ÷ transformers time, worst length": {
            "value": worst, "target": TARGET, "pass": worst <= TARGET}}
    return result


def print_table(r: dict) -> None:
    """The Markdown table the README quotes, then the target."""
    hf = "targets" in r
    print("time to first token, greedy, batch 1, random prompt ids; best of rounds (median in "
          "the JSON)\n")
    print("| prompt tokens | jaxspec, s | prompt tok/s |"
          + (" transformers, s | prompt tok/s | jaxspec ÷ transformers | same first token |"
             if hf else ""))
    print("|---|---|---|" + ("---|---|---|---|" if hf else ""))
    for n, row in r["lengths"].items():
        line = f"| {n} | {row['jaxspec']['best']:.3f} | {int(n) / row['jaxspec']['best']:.0f} |"
        if hf:
            t = row["transformers"]["best"]
            line += (f" {t:.3f} | {int(n) / t:.0f} | {row['ratio']:.2f} | "
                     f"{row['first_tokens_identical']} |")
        print(line)
    for name, t in r.get("targets", {}).items():
        print(f"\n{'PASS' if t['pass'] else 'FAIL'}  {name}: {t['value']:.2f} (target <= "
              f"{t['target']})")


def plot(r: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    lengths = [int(n) for n in r["lengths"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, style in (("jaxspec", "o-"), ("transformers", "s--")):
        if all(name in row for row in r["lengths"].values()):
            ax.plot(lengths, [row[name]["best"] for row in r["lengths"].values()], style,
                    label=name)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("seconds to the first new token")
    ax.set_title("time to first token (prefill), greedy, batch 1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
