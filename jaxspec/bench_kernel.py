"""`scripts/benchmark.py --kernel`: the CPU matmul kernel on and off, in one run.

The same model is placed twice: in the CPU layout (fp32 weights packed in panels, every
projection through jaxspec.kernels.cpu_matmul) and in "cpu-xla" (plain [K, N] weights, XLA's
dot). Rounds interleave every measurement (noise hits both alike): plain greedy decoding
(tok/s), one prefill forward, and a forward step on 1 and on γ + 1 tokens per γ. v(T) is a
T-token step's time ÷ the 1-token step's time of the same layout; the issue's targets are
v ≤ 1.15 at 3 tokens, 1.3 at 5, 1.6 at 9, and plain decoding no slower with the kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from jaxspec import bench
from jaxspec.decode.sizing import loop_max_len
from jaxspec.models import layout as layouts

LAYOUTS = {"kernel": layouts.CPU, "xla": layouts.CPU_XLA}
V_TARGETS = {3: 1.15, 5: 1.3, 9: 1.6}


def run(target, prompt: list[int], *, gammas: list[int], max_new_tokens: int, steps: int,
        repeats: int, progress: Callable) -> dict:
    """Every measurement for both layouts (see the module docstring); a JSON-able dict."""
    from jaxspec import SpeculativeDecoder
    from jaxspec.checkpoint.load import place

    models = {name: place(target, layout) for name, layout in LAYOUTS.items()}
    max_len = loop_max_len(len(prompt), max_new_tokens, 0)
    position = len(prompt) + max_new_tokens // 2
    widths = sorted({1, *(g + 1 for g in gammas)})
    calls = {}
    for name, m in progress(list(models.items())):
        decode = SpeculativeDecoder(m, None)
        calls[f"{name} decode"] = functools.partial(bench.run_jaxspec, decode, prompt,
                                                    max_new_tokens=max_new_tokens)
        calls[f"{name} prefill"] = bench.Prefill(m, len(prompt), max_len)
        for w in widths:
            calls[f"{name} step{w}"] = bench.StepTimer(m, width=w, max_len=max_len,
                                                        position=position, steps=steps)
    for name in LAYOUTS:  # compile and warm up the decoders
        calls[f"{name} decode"]()
    seen = bench.interleaved(calls, repeats, progress)
    return summary(seen, widths, len(prompt), max_new_tokens)


def summary(seen: dict[str, list], widths: list[int], prompt_tokens: int, new: int) -> dict:
    best = functools.partial(bench.best_median, larger_is_better=False)
    result = {"prompt_tokens": prompt_tokens, "max_new_tokens": new, "layouts": {}}
    for name in LAYOUTS:
        runs = seen[f"{name} decode"]
        steps = {w: best(seen[f"{name} step{w}"]) for w in widths}
        result["layouts"][name] = {
            "decode_tok_s": bench.best_median([s["tokens_per_second"] for _, s in runs]),
            "prefill_seconds": best(seen[f"{name} prefill"]),
            "step_seconds": steps,
            "v": {w: steps[w]["best"] / steps[1]["best"] for w in widths},
            "tokens": runs[0][0],
        }
    kernel, xla = result["layouts"]["kernel"], result["layouts"]["xla"]
    result["tokens_identical"] = kernel.pop("tokens") == xla.pop("tokens")
    result["decode_speedup"] = kernel["decode_tok_s"]["best"] / xla["decode_tok_s"]["best"]
    targets = {f"v at {w} tokens": (kernel["v"][w], limit, kernel["v"][w] <= limit)
               for w, limit in V_TARGETS.items() if w in widths}
    targets["plain decoding, kernel ÷ XLA"] = (result["decode_speedup"], 1.0,
                                              result["decode_speedup"] >= 1.0)
    result["targets"] = {k: {"value": v, "target": t, "pass": p}
                         for k, (v, t, p) in targets.items()}
    return result


def print_table(r: dict) -> None:
    """The Markdown table the README quotes, then the targets."""
    k, x = r["layouts"]["kernel"], r["layouts"]["xla"]
    print(f"prompt {r['prompt_tokens']} tokens, {r['max_new_tokens']} new tokens, greedy, fp32, "
          "batch 1; best of repeats (median in the JSON)\n")
    print("| | kernel (CPU layout) | XLA (cpu-xla) | kernel ÷ XLA time |")
    print("|---|---|---|---|")
    print(f"| plain decoding, tok/s | {k['decode_tok_s']['best']:.1f} | "
          f"{x['decode_tok_s']['best']:.1f} | {1 / r['decode_speedup']:.2f} |")
    print(f"| prefill, ms | {k['prefill_seconds']['best'] * 1e3:.0f} | "
          f"{x['prefill_seconds']['best'] * 1e3:.0f} | "
          f"{k['prefill_seconds']['best'] / x['prefill_seconds']['best']:.2f} |")
    for w in k["step_seconds"]:
        ks, xs = k["step_seconds"][w]["best"], x["step_seconds"][w]["best"]
        print(f"| step on {w} token{'s' if w > 1 else ''}, ms (v) | {ks * 1e3:.2f} "
              f"({k['v'][w]:.2f}) | {xs * 1e3:.2f} ({x['v'][w]:.2f}) | {ks / xs:.2f} |")
    print(f"\ngreedy tokens identical with and without the kernel: {r['tokens_identical']}")
    for name, t in r["targets"].items():
        sign = "<=" if name.startswith("v ") else ">="
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {name}: {t['value']:.3f} (target {sign} "
              f"{t['target']})")


def plot(r: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, style in (("kernel", "o-"), ("xla", "s--")):
        v = r["layouts"][name]["v"]
        ax.plot(list(v), list(v.values()), style, label=LAYOUTS[name].name)
    ax.plot(list(V_TARGETS), list(V_TARGETS.values()), "k_", ms=16, label="target")
    ax.axhline(1.0, c="gray", lw=1)
    ax.set_xlabel("tokens per forward step (γ + 1 in a verify)")
    ax.set_ylabel("v = step time ÷ 1-token step time")
    ax.set_title("verify cost on CPU, kernel on and off")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
