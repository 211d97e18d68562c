"""The CLI's start-up, measured as a user meets it: wall time of whole
`python -m jaxspec.generate PROMPT [--model MODEL]` processes (default: the default model).

In a fresh cache folder (the default model's converted checkpoint and the built CPU kernel are
linked in from the user's cache, so no download, conversion or kernel build is counted):

  cold      the first process: the params are restored and laid out (and saved for the next
            process, jaxspec.checkpoint.mapped), every program is traced, compiled and saved
  warm      later processes, with every cache (mapped params, jaxspec.program_cache, JAX's)
  warm_xla  later processes whose programs come from JAX's compilation cache only
            (`JAXSPEC_COMPILE_CACHE=xla`: traced again, not compiled)

Warm runs of the two kinds alternate, so that both see the same machine. Each row reports the
wall times and what the CLI's `--verbose` stderr says of them: seconds loading the model,
resolving the draft, getting the programs (traced and compiled, or loaded) and decoding.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from jaxspec.checkpoint import default_model
from jaxspec.paths import cache_dir

PROMPT = "What is the capital of France?"
LINKED = ("kernels",)  # besides the converted default model
DECODE = re.compile(r"in ([\d.]+) s: ")
STARTUP = re.compile(r"start-up: model ([\d.]+) s, draft ([\d.]+) s, programs ([\d.]+) s")
PARTS = ("model_s", "draft_s", "programs_s", "decode_s")


def run_cli(prompt: str, cache: str, setting: str, model: str | None = None) -> dict:
    """One CLI process: wall seconds, and the seconds its --verbose stderr reports (PARTS)."""
    env = {**os.environ, "JAXSPEC_CACHE": cache, "JAXSPEC_COMPILE_CACHE": setting}
    command = [sys.executable, "-m", "jaxspec.generate", prompt, "--verbose"]
    start = time.perf_counter()
    done = subprocess.run(command + (["--model", model] if model else []), env=env,
                          capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"the CLI failed: {done.stderr.strip()[-500:]}")
    decode, startup = DECODE.search(done.stderr), STARTUP.search(done.stderr)
    if decode is None or startup is None:
        raise RuntimeError(f"unexpected CLI statistics: {done.stderr.strip()[-500:]}")
    seconds = [float(x) for x in startup.groups()] + [float(decode[1])]
    return {"wall_s": wall, **dict(zip(PARTS, seconds)), "text": done.stdout.strip()}


def fresh_cache(folder: str, model: str | None) -> str:
    """A cache folder holding links to the built kernel and (model None) the converted default
    model."""
    if model is None:
        converted = default_model.ensure_converted()
        os.symlink(converted, os.path.join(folder, os.path.basename(converted)))
    for name in LINKED:
        source = os.path.join(cache_dir(), name)
        if os.path.isdir(source):
            os.symlink(source, os.path.join(folder, name))
    return folder


def run(prompt: str = PROMPT, repeats: int = 5, model: str | None = None,
        progress=lambda it: it) -> dict:
    """cold once, then `repeats` rounds of warm and warm_xla; medians and every run. model:
    a path for --model, None for the default model."""
    with tempfile.TemporaryDirectory(prefix="jaxspec-startup-") as folder:
        cache = fresh_cache(folder, model)
        runs = {"cold": [run_cli(prompt, cache, "1", model)], "warm": [], "warm_xla": []}
        for _ in progress(range(repeats)):
            runs["warm"].append(run_cli(prompt, cache, "1", model))
            runs["warm_xla"].append(run_cli(prompt, cache, "xla", model))
    rows = {name: _summary(rs) for name, rs in runs.items()}
    texts = {r["text"] for rs in runs.values() for r in rs}
    return {"prompt": prompt, "model": model, "repeats": repeats, "rows": rows,
            "same_text": len(texts) == 1,
            "text": texts.pop() if len(texts) == 1 else sorted(texts)}


def _summary(runs: list[dict]) -> dict:
    medians = {key: statistics.median(r[key] for r in runs) for key in ("wall_s", *PARTS)}
    return {**medians, "walls": [r["wall_s"] for r in runs]}


def print_table(r: dict) -> None:
    print(f"`python -m jaxspec.generate {r['prompt']!r}`: medians of {r['repeats']} warm runs "
          f"(cold: one run); same text in every run: {r['same_text']}")
    print("| process | wall s | model s | draft s | programs s | decode s | walls |\n"
          "|---|---|---|---|---|---|---|")
    for name, row in r["rows"].items():
        parts = " | ".join(f"{row[key]:.2f}" for key in PARTS)
        walls = ", ".join(f"{w:.2f}" for w in row["walls"])
        print(f"| {name} | {row['wall_s']:.2f} | {parts} | {walls} |")


def plot(r: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    names = list(r["rows"])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(names, [r["rows"][k]["wall_s"] for k in names], color=["C3", "C0", "C1"])
    for target in r.get("targets", {}).values():
        ax.axhline(target["target"], color="gray", lw=1, ls="--")
    ax.set_ylabel("wall seconds (median)")
    ax.set_title(f"CLI start-up, {os.path.basename(r['model'] or 'default model')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
