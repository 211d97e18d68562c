"""The benchmark suite's report: Markdown tables and PNG plots from `bench_suite.run`'s dict.

    markdown(result)      settings and machine, the hardware floor, one row per configuration
                          (with a speedup column per category), acceptance per draft position
    plot(result, stem)    <stem>_speedup.png (speedup vs γ per draft, a line per category) and
                          <stem>_acceptance.png (acceptance per position at the largest γ)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

ALL = "all"  # the row aggregating every selected prompt


def draft_label(name: str) -> str:
    """A draft's name for tables and plots: a checkpoint path by its last component."""
    from jaxspec.drafts import registry

    if registry.parse(name).kind != registry.MODEL:
        return name
    return os.path.basename(os.path.normpath(name))


def markdown(result: dict) -> str:
    """The Markdown report: settings, the hardware floor, every configuration, and the
    acceptance per position at the largest γ."""
    return "\n\n".join([header(result), floor_table(result), config_table(result),
                        position_table(result)]) + "\n"


def header(r: dict) -> str:
    m, s = r["machine"], r["settings"]
    cats = ", ".join(f"{c} ({n})" for c, n in category_counts(r).items())
    share = r["other_processes_cpu_share"]
    return (f"Machine: {m['cpu_model']}, {m['cpu_count']} CPUs, backend {m['backend']} "
            f"({', '.join(m['devices'])}), JAX {m['jax']}, jaxlib {m['jaxlib']}, {m['date']}"
            + (f"; other processes used {share:.0%} of the CPUs" if share is not None else "")
            + f".\nModel {s['model']} ({s['dtype']}), greedy, batch 1, {s['max_new_tokens']} new "
            f"tokens per prompt (EOS ignored), {s['repeats']} timed run(s) per prompt; "
            f"prompts: {cats}.")


def category_counts(r: dict) -> dict:
    return {c: v["prompts"] for c, v in r["configs"][0]["categories"].items() if c != ALL}


def floor_table(r: dict) -> str:
    h = r["hardware"]
    plain = next(c for c in r["configs"] if c["engine"] == "jaxspec" and c["gamma"] == 0)
    tok_s = plain["categories"][ALL]["tok_s"]
    lines = ["| hardware floor | GB/s | floor tok/s | jaxspec plain ÷ floor |",
             "|---|---|---|---|"]
    for k, bw in h["bandwidth_gb_s"].items():
        floor = h["floor_tok_s"][k]
        lines.append(f"| {k.replace('_', ' ')} | {bw['best']:.1f} | {floor:.1f} | "
                     f"{tok_s / floor:.0%} |")
    return "\n".join(lines) + (f"\n\nWeights read per decode step: "
                               f"{h['weight_bytes_per_token'] / 1e6:.1f} MB.")


def config_table(r: dict) -> str:
    cats = list(category_counts(r))
    head = (["configuration", "tok/s", "speedup", "predicted", "α", "tokens/verify", "c", "v"]
            + [f"{c} speedup (α)" for c in cats]
            + ["compile s", "peak RSS +MiB", "same tokens"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in r["configs"]:
        lines.append("| " + " | ".join(config_cells(row, cats)) + " |")
    lines.append("\nspeedup: tokens/s ÷ the same engine's plain decoding on the same prompts; "
                 "predicted = tokens/verify ÷ (γ·c + v); α, tokens/verify, c, v: jaxspec "
                 "drafts only; same tokens: prompts whose output equals jaxspec plain's.")
    return "\n".join(lines)


def config_cells(row: dict, cats: Sequence[str]) -> list[str]:
    a = row["categories"][ALL]
    cells = [row["name"], f"{a['tok_s']:.1f}", _x(a.get("speedup")),
             _x(a.get("predicted_speedup")), _f(a.get("acceptance_rate")),
             _f(a.get("mean_accepted_length")), _f(row.get("c"), 3), _f(row.get("v"), 3)]
    for c in cats:
        cat = row["categories"][c]
        alpha = f" ({cat['acceptance_rate']:.2f})" if "acceptance_rate" in cat else ""
        cells.append(_x(cat.get("speedup")) + alpha)
    compile_s = row.get("compile_seconds")
    cells += [_f(compile_s, 1), f"{row['peak_rss_growth_mib']:.0f}",
              f"{a['identical_to_plain']}/{a['prompts']}"]
    return cells


def _x(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _f(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def position_table(r: dict) -> str:
    rows = [c for c in r["configs"] if c["engine"] == "jaxspec" and c["gamma"]]
    if not rows:
        return "(no speculative configuration)"
    top = max(c["gamma"] for c in rows)
    head = ["draft", "γ", "category"] + [f"pos {i + 1}" for i in range(top)]
    lines = [f"Acceptance per draft position at γ = {top} (fraction of verify iterations "
             "that accepted position i):", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for row in (c for c in rows if c["gamma"] == top):
        for cat, v in row["categories"].items():
            cells = [draft_label(row["draft"]), str(top), cat] + [f"{x:.2f}" for x in
                                                      v["accepted_per_position"]]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, stem: str) -> list[str]:
    """Two PNGs: speedup vs γ per draft (a line per category, predicted dashed) and
    acceptance per position at the largest γ; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    paths = [f"{stem}_speedup.png", f"{stem}_acceptance.png"]
    plot_speedup(result, paths[0])
    plot_positions(result, paths[1])
    return paths


def _draft_rows(result: dict) -> dict[str, list[dict]]:
    """{panel title: the configurations of one draft, by γ} (plain decoding left out)."""
    rows: dict[str, list[dict]] = {}
    for c in result["configs"]:
        if c["gamma"]:
            label = (draft_label(c["draft"]) if c["engine"] == "jaxspec"
                     else f"transformers {c['draft']}\n(÷ transformers greedy)")
            rows.setdefault(label, []).append(c)
    return rows


def _panels(count: int, height: float):
    """A figure with `count` panels, at most 3 per row; (figure, flat list of axes)."""
    import matplotlib.pyplot as plt

    cols = min(3, max(1, count))
    rows = max(1, -(-count // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat


def _category_lines(ax, x, per_category: dict[str, list[float]]) -> None:
    for i, (cat, y) in enumerate(per_category.items()):
        style = {"lw": 2.5, "c": "k"} if cat == ALL else {"lw": 1.2, "c": f"C{i}"}
        ax.plot(x, y, "o-", ms=3, label=cat, **style)


def plot_speedup(result: dict, path: str) -> None:
    """Measured speedup vs γ, a panel per draft, a line per category; predicted dashed."""
    import matplotlib.pyplot as plt

    drafts = _draft_rows(result)
    fig, axes = _panels(len(drafts), 3.8)
    for ax, (label, rows) in zip(axes, drafts.items()):
        gammas = [r["gamma"] for r in rows]
        _category_lines(ax, gammas, {cat: [r["categories"][cat]["speedup"] for r in rows]
                                     for cat in rows[0]["categories"]})
        if "predicted_speedup" in rows[0]["categories"][ALL]:
            ax.plot(gammas, [r["categories"][ALL]["predicted_speedup"] for r in rows], "k--",
                    lw=1, label="all, predicted")
        ax.axhline(1.0, c="gray", lw=0.8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("γ (drafts per iteration)")
        ax.set_ylabel("speedup over plain decoding")
        ax.set_xticks(gammas)
    axes[0].legend(fontsize=7)
    fig.suptitle("measured speedup per category (tokens/s ÷ the engine's plain decoding)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_positions(result: dict, path: str) -> None:
    """Fraction of iterations accepting each draft position, at each draft's largest γ."""
    import matplotlib.pyplot as plt

    drafts = {k: v for k, v in _draft_rows(result).items()
              if "accepted_per_position" in v[0]["categories"][ALL]}
    fig, axes = _panels(len(drafts), 3.5)
    for ax, (label, rows) in zip(axes, drafts.items()):
        top = max(rows, key=lambda r: r["gamma"])
        positions = list(range(1, top["gamma"] + 1))
        _category_lines(ax, positions, {cat: v["accepted_per_position"]
                                        for cat, v in top["categories"].items()})
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{label}, γ = {top['gamma']}", fontsize=10)
        ax.set_xlabel("draft position")
        ax.set_ylabel("fraction of iterations accepting it")
        ax.set_xticks(positions)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
