"""Choosing γ by measurement: `num_speculative_tokens="auto"`.

With acceptance rate α (each draft accepted independently), a draft step costing c and a
verify of γ + 1 tokens costing v_γ, both in target decode steps, one iteration yields
E_γ = (1 − α^(γ+1)) / (1 − α) tokens for γ·c + v_γ steps. γ = 0 is plain decoding (E = 1,
v_0 = 1 by definition), chosen whenever no γ ≥ 1 is predicted to beat it.

The profile measures α on one short speculative run at the largest γ (the first prompt,
greedy, the maximum-likelihood estimate below), c from the draft's one-token forward (0 for
model-free drafts) and v_γ from the target's forward on γ + 1 tokens at a few widths
(interpolated between them), all at the batch size of the call: B rows of γ + 1 tokens cost
more than B steps of one where a forward is compute-bound (a CPU), so the γ that pays for
one prompt can cost time for eight (README: "Batches"). The choice is cached in
`$JAXSPEC_CACHE/gamma.json` per target, draft, platform, dtype, batch size (rounded up to a
power of two: `batch_bucket`) and largest γ, so later processes do not profile again.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os

from jaxspec.errors import UserError
from jaxspec.paths import cache_dir, writable_cache_dir, write_atomically

MAX_AUTO_GAMMA = 8
PROFILE_TOKENS = 32  # new tokens of the run that measures α
MEASURED_WIDTHS = (1, 2, 3, 5, 9)  # verify widths γ + 1 that are timed; others interpolated


def batch_bucket(batch: int) -> int:
    """The batch size a choice is profiled and cached for: the next power of two (a few
    profiles cover every size; a larger batch's costs make the choice the cautious one)."""
    return 1 << max(0, batch - 1).bit_length()


def expected_tokens(alpha: float, gamma: int) -> float:
    """(1 − α^(γ+1)) / (1 − α): expected tokens per iteration (γ + 1 when α = 1)."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def predicted_speedup(tokens_per_iteration: float, gamma: int, c: float, v: float) -> float:
    """Speedup over plain decoding: tokens per iteration ÷ iteration cost in decode steps."""
    return tokens_per_iteration / (gamma * c + v)


def predicted_speedups(alpha: float, c: float, v: dict[int, float]) -> dict[int, float]:
    """{γ: predicted speedup over plain decoding} for every γ in v (v[0] must be 1)."""
    return {g: predicted_speedup(expected_tokens(alpha, g), g, c, v[g]) for g in sorted(v)}


def best_gamma(alpha: float, c: float, v: dict[int, float]) -> int:
    """The γ in v with the largest predicted speedup (the smaller γ on a tie; 0 = plain)."""
    speedups = predicted_speedups(alpha, c, v)
    return max(sorted(speedups), key=lambda g: (speedups[g], -g))


def alpha_estimate(iterations: int, accepted: int, all_accepted: int) -> float:
    """Maximum-likelihood α of i.i.d. acceptances, from a run's counters: an iteration that
    accepted n < γ drafts made n + 1 trials, one that accepted all γ made γ trials."""
    trials = accepted + iterations - all_accepted
    return accepted / trials if trials else 0.0


def interpolate(measured: dict[int, float], max_gamma: int) -> dict[int, float]:
    """v_γ for γ = 0..max_gamma, linear between the measured γ (γ beyond them: the last)."""
    known = sorted(measured)
    out = {}
    for g in range(max_gamma + 1):
        lower = max(k for k in known if k <= g)
        upper = min((k for k in known if k >= g), default=lower)
        t = 0.0 if upper == lower else (g - lower) / (upper - lower)
        out[g] = (1 - t) * measured[lower] + t * measured[upper]
    return out


@dataclasses.dataclass(frozen=True)
class Choice:
    gamma: int
    alpha: float
    c: float
    v: dict[int, float]
    source: str  # "profiled" or "cache"

    def as_stats(self) -> dict:
        return {"gamma": self.gamma, "alpha": self.alpha, "c": self.c,
                "v": {str(g): x for g, x in self.v.items()}, "source": self.source,
                "predicted_speedup": {str(g): s for g, s in
                                      predicted_speedups(self.alpha, self.c, self.v).items()}}


def _cache_path() -> str:
    return os.path.join(cache_dir(), "gamma.json")


def cache_key(target, draft_name: str, platform: str, batch: int = 1,
              max_gamma: int = MAX_AUTO_GAMMA) -> str:
    """Per target (its path and config), draft, platform, dtypes (the params' leaves: GGUF
    blocks decode at other costs than fp32 weights), batch size and largest γ."""
    import jax

    dtype = ",".join(sorted({str(leaf.dtype) for leaf in jax.tree.leaves(target.params)}))
    ident = repr((target.path, target.config, draft_name, platform, dtype, batch, max_gamma))
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def load_cached(key: str) -> Choice | None:
    try:
        with open(_cache_path(), encoding="utf-8") as f:
            entry = json.load(f)[key]
        v = {int(g): float(x) for g, x in entry["v"].items()}
        return Choice(int(entry["gamma"]), float(entry["alpha"]), float(entry["c"]), v, "cache")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(key: str, choice: Choice) -> None:
    """Add the choice to the cache file (written atomically; a failure, an unwritable cache
    included, only costs a profile in a later process)."""
    path = _cache_path()
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, ValueError):
        entries = {}
    entries[key] = {k: v for k, v in choice.as_stats().items()
                    if k in ("gamma", "alpha", "c", "v")}
    try:
        writable_cache_dir()
        write_atomically(path, json.dumps(entries, indent=1).encode("utf-8"))
    except (OSError, UserError):
        pass


def profile(target, draft_model, run, *, prompt_length: int, max_new_tokens: int,
            max_gamma: int = MAX_AUTO_GAMMA, steps: int = 8, rounds: int = 5,
            batch: int = 1) -> Choice:
    """Measure α, c and v_γ and choose γ (see the module docstring); c and v at `batch` rows.

    run(γ) -> the statistics of one row generated greedily at that γ (the API's decoder);
    draft_model: the draft's model (config + params), a draft head as (HeadDraft, its loop
    params) (c: a proposal step plus its share of the observe of γ + 2 entries at the
    largest γ), or None for a model-free draft (c = 0).
    """
    from jaxspec import bench
    from jaxspec.decode.sizing import loop_max_len

    max_len = loop_max_len(prompt_length, max_new_tokens, max_gamma)
    position = min(prompt_length, max_len - max_gamma - 2)

    where = dict(max_len=max_len, position=position, steps=steps, batch=batch)
    widths = [w for w in MEASURED_WIDTHS if w <= max_gamma + 1]
    timers = {f"verify{w}": functools.partial(bench.StepTimer, target, width=w, **where)
              for w in widths}
    if isinstance(draft_model, tuple):  # a proposal step and its share of an observe
        timers["draft"] = functools.partial(bench.HeadStepTimer, *draft_model, width=1, **where)
        width = draft_model[0].observed_entries(max_gamma)
        timers["observe"] = functools.partial(bench.HeadStepTimer, *draft_model, width=width,
                                              observe=True, **where)
    elif draft_model is not None:
        timers["draft"] = functools.partial(bench.StepTimer, draft_model, width=1,
                                            last_only=True, **where)
    # the timers compile side by side (XLA releases the GIL) while this thread runs α's row
    with concurrent.futures.ThreadPoolExecutor(
            os.cpu_count() or 1, thread_name_prefix="jaxspec-profile") as pool:
        pending = {name: pool.submit(make) for name, make in timers.items()}
        row = run(max_gamma)
        built = {name: future.result() for name, future in pending.items()}
    alpha = alpha_estimate(row["target_forward_calls"] - 1, row["draft_tokens_accepted"],
                           row["accepted_per_position"][-1])
    # every timer once per round, best of the rounds: a busy moment of the machine slows all
    # widths of a round alike instead of one ratio
    seconds = {name: min(t) for name, t in bench.interleaved(built, rounds).items()}
    decode = seconds["verify1"]
    v = interpolate({w - 1: seconds[f"verify{w}"] / decode for w in widths}, max_gamma)
    c = (seconds.get("draft", 0.0) + seconds.get("observe", 0.0) / max_gamma) / decode
    return Choice(best_gamma(alpha, c, v), alpha, c, v, "profiled")
