"""Prompts and machine facts for the benchmark suite (jaxspec.bench_suite).

The prompt set is JSONL, one {"category": ..., "prompt": ...} per line; a malformed line is a
one-line UserError naming its number. The machine record (CPU, accelerator, versions, date)
goes into the suite's JSON; PeakRss charges configurations for raising the process's peak
resident set size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import sys
from collections.abc import Callable, Sequence

from jaxspec.errors import UserError

BYTE_PROMPT_TOKENS = 100  # prompt length without a tokenizer


# ---------------------------------------------------------------------------- prompts


@dataclasses.dataclass(frozen=True)
class Prompt:
    category: str
    text: str
    line: int  # 1-based line in its file


def load_prompts(path: str) -> list[Prompt]:
    """Prompts from a JSONL file: one object with string "category" and "prompt" per line
    (blank lines skipped). UserError naming the line for a malformed one."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompts file {path}: {getattr(e, 'strerror', e)}") from None
    prompts = [_parse_line(path, number, line) for number, line in enumerate(lines, 1)
               if line.strip()]
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def _parse_line(path: str, number: int, line: str) -> Prompt:
    where = f"{path} line {number}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object with \"category\" and \"prompt\"")
    for key in ("category", "prompt"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise UserError(f"{where}: \"{key}\" must be a non-empty string")
        try:
            obj[key].encode("utf-8")
        except UnicodeEncodeError:  # JSON can escape a lone surrogate: "\\ud800"
            raise UserError(f"{where}: \"{key}\" is not valid Unicode (a lone surrogate)") from None
    return Prompt(obj["category"], obj["prompt"], number)


def select_prompts(prompts: Sequence[Prompt], categories: Sequence[str] | None,
                   per_category: int) -> list[Prompt]:
    """The first per_category prompts of each category (file order of categories unless
    given); UserError for a category the file lacks."""
    present = list(dict.fromkeys(p.category for p in prompts))
    wanted = categories or present
    missing = [c for c in wanted if c not in present]
    if missing:
        raise UserError(f"no prompts in category {missing[0]!r} (the file has: "
                        f"{', '.join(present)})")
    return [p for c in wanted for p in [q for q in prompts if q.category == c][:per_category]]


def encode(model, text: str) -> list[int]:
    """Token ids of a prompt: chat-templated when the model's tokenizer has a template; without
    a tokenizer (random weights), the text's first BYTE_PROMPT_TOKENS bytes mapped into the
    vocabulary (one prompt width for all, as the bundled prompts have with SmolLM2's)."""
    from jaxspec import bench

    if model.tokenizer is not None:
        return bench.prompt_ids(model, text)
    data = text.encode()[:BYTE_PROMPT_TOKENS]
    return [3 + b % (model.config.vocab_size - 3) for b in data]


def fit(ids: list[int], limit: int) -> list[int]:
    """The last `limit` ids (the end of a chat-templated prompt asks for the answer)."""
    return ids[-limit:]


# ---------------------------------------------------------------------------- machine


def machine_info() -> dict:
    """CPU model and count, accelerator, JAX/jaxlib versions, backend, date (UTC)."""
    import jax
    import jaxlib

    backend = jax.default_backend()
    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "backend": backend, "devices": sorted({d.device_kind for d in jax.devices()}),
        "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
    }
    if backend != "cpu":
        info["accelerator"] = jax.devices()[0].device_kind
    for package in ("numpy", "transformers", "torch"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[package] = importlib.metadata.version(package)
    return info


def cpu_model() -> str:
    """'model name' from /proc/cpuinfo (Linux), else platform.processor()."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


class PeakRss:
    """Growth of the process's peak resident set size (getrusage ru_maxrss), per name.

    The peak is a high-water mark over the whole process, so a configuration is charged only
    for raising it above every earlier peak: the first to compile or allocate something large
    is charged for it, later ones that fit under that peak show 0.
    """

    UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux

    def __init__(self):
        self.grown: dict[str, int] = {}

    @staticmethod
    def now_bytes() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * PeakRss.UNIT

    def call(self, name: str, fn: Callable, *args):
        before = self.now_bytes()
        out = fn(*args)
        self.grown[name] = self.grown.get(name, 0) + self.now_bytes() - before
        return out
