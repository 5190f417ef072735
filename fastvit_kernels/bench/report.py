"""Results out: the printed table, the JSON file, and the speedup plot drawn from a JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence

COLUMNS = ("case", "dtype", "impl", "median ms", "IQR ms", "vs eager", "vs compile", "img/s", "GB/s",
           "GFLOP/s", "GEMM floor ms", "% peak BW", "max err", "tol", "ok")
# Columns shown only when some row has a value: (column, row key).
OPTIONAL_COLUMNS = (("img/s", "images_per_s"), ("GEMM floor ms", "gemm_floor_ms"), ("% peak BW", "peak_memory_pct"))


def _number(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _speedup(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _cells(row: dict) -> List[str]:
    return [row["case"], row["dtype"], row["impl"], f"{row['median_ms']:.3f}",
            f"{row['q1_ms']:.3f}-{row['q3_ms']:.3f}", _speedup(row["speedup_vs_eager"]),
            _speedup(row["speedup_vs_compile"]), _number(row.get("images_per_s"), ".1f"),
            _number(row["gbps"], ".1f"), _number(row["gflops"], ".1f"), _number(row.get("gemm_floor_ms"), ".1f"),
            _number(row["peak_memory_pct"], ".0f"),
            "non-finite" if row["max_abs_error"] is None else f"{row['max_abs_error']:.1e}",
            f"{row['tolerance']:.1e}", "pass" if row["passed"] else "FAIL"]


def format_table(rows: Sequence[dict], skipped: Sequence[dict] = ()) -> str:
    """A fixed-width text table, one block per (case, dtype), then what was skipped and why."""
    hidden = {column for column, key in OPTIONAL_COLUMNS if all(r.get(key) is None for r in rows)}
    columns = [c for c in COLUMNS if c not in hidden]
    table = [[c for c, name in zip(_cells(r), COLUMNS) if name not in hidden] for r in rows]
    widths = [max([len(col)] + [len(cells[i]) for cells in table]) for i, col in enumerate(columns)]
    text_columns = 3  # case, dtype, impl: left-aligned; numbers right-aligned

    def line(cells):
        return "  ".join(c.ljust(w) if i < text_columns else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = [line(columns), line(["-" * w for w in widths])]
    previous = None
    for row, cells in zip(rows, table):
        group = (row["case"], row["dtype"])
        if previous is not None and group != previous:
            lines.append("")
        previous = group
        lines.append(line(cells))
    for s in skipped:
        lines.append(f"skipped: {s['case']} {s['dtype']} {s['impl']}: {s['reason']}")
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def plot_speedups(json_path, png_path=None) -> Path:
    """Draw speedup vs eager per (case, dtype) and implementation from a results JSON; returns the PNG
    path (default: the JSON's, with ``.png``). Rows that failed the correctness check are hatched.

    Raises ImportError when matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    json_path = Path(json_path)
    png_path = Path(png_path) if png_path else json_path.with_suffix(".png")
    result = json.loads(json_path.read_text())
    rows = result["rows"]
    groups = list(dict.fromkeys((r["case"], r["dtype"]) for r in rows))
    # Eager is the reference line at 1x, not a bar.
    impls = list(dict.fromkeys(r["impl"] for r in rows if r["impl"] != "eager"))
    by_key = {(r["case"], r["dtype"], r["impl"]): r for r in rows}

    bar = 0.8 / max(1, len(impls))
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.35 * max(1, len(impls)) * max(1, len(groups))))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, impl in enumerate(impls):
        ys, xs, failed = [], [], []
        for i, (case, dtype) in enumerate(groups):
            row = by_key.get((case, dtype, impl))
            if row is None or row["speedup_vs_eager"] is None:
                continue
            ys.append(i + (j - (len(impls) - 1) / 2) * bar)
            xs.append(row["speedup_vs_eager"])
            failed.append(not row["passed"])
        color = colors[j % len(colors)]
        # Bars grow from 1x on a log axis: faster to the right, slower to the left, 2x and 0.5x
        # equally long.
        bars = ax.barh(ys, [x - 1.0 for x in xs], left=1.0, height=bar, color=color, label=impl)
        for rect, x, bad in zip(bars, xs, failed):
            if bad:
                rect.set_hatch("xx")
                rect.set_edgecolor("red")
            ax.annotate(f"{x:.2f}x" + (" FAIL" if bad else ""), (x, rect.get_y() + rect.get_height() / 2),
                        xytext=(3 if x >= 1 else -3, 0), textcoords="offset points", va="center",
                        ha="left" if x >= 1 else "right", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--", label="eager (1x)")
    ax.set_yticks(range(len(groups)), [f"{case}\n{dtype}" for case, dtype in groups], fontsize=8)
    ax.invert_yaxis()  # first case on top, as in the table
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xlabel("speedup vs eager PyTorch (median time, log scale; right of the line is faster)")
    speedups = [r["speedup_vs_eager"] for r in rows if r["speedup_vs_eager"]]
    # Room on both sides for the value labels.
    ax.set_xlim(min([0.5] + speedups) / 1.6, max([2.0] + speedups) * 1.6)
    device = result.get("device", {})
    threads = f", {device['threads']} threads" if device.get("type") == "cpu" else ""
    ax.set_title(f"{result.get('op', '')} on {device.get('name', '?')}{threads}\n{result.get('date', '')}",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a bar
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
