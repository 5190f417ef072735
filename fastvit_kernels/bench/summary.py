"""Summaries of stored results: the README's results section and the runbook's summary, both made
from the JSON files, so no figure is ever typed by hand.

``results_markdown(dir)`` takes, for every device and registry entry, the newest JSON under ``dir``
(sub-folders too: the GPU runbook writes one folder per run) and makes one table row of it: the
fastest fused backend per (case, dtype), its speedups (geometric mean and range over the cases),
throughput and whether every fused row was within tolerance.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def load_results(results_dir) -> List[Tuple[Path, dict]]:
    """Every benchmark results JSON under ``results_dir`` (recursively), as (path, result)."""
    found = []
    for path in sorted(Path(results_dir).rglob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(result, dict) and {"op", "device", "rows", "date"} <= result.keys():
            found.append((path, result))
    return found


def _date(result: dict) -> datetime.datetime:
    date = datetime.datetime.fromisoformat(result["date"])
    return date if date.tzinfo else date.replace(tzinfo=datetime.timezone.utc)


def device_key(result: dict) -> Tuple[str, str]:
    return result["device"]["type"], result["device"]["name"]


def newest_per_device_and_entry(results: Iterable[Tuple[Path, dict]]) -> Dict[Tuple, Tuple[Path, dict]]:
    """{(device type, device name, op, dtypes, backends): (path, result)} keeping the newest ``date`` of
    each: a run in other dtypes (bfloat16 after float32) or of other backends (reference after cpu)
    does not hide the older one. A run with no fused row that passed is left out where the op has
    another on that device (T2T-ViT's cpu-only run, which no kernel could serve, beside its auto run)."""
    newest = {}
    for path, result in results:
        key = (*device_key(result), result["op"], tuple(result["settings"]["dtypes"]),
               tuple(result.get("benchmarked_backends", ())))
        if key not in newest or _date(result) > _date(newest[key][1]):
            newest[key] = (path, result)
    measured = {key[:3] for key, (_, result) in newest.items() if best_fused_rows(result)}
    return {key: value for key, value in newest.items() if best_fused_rows(value[1]) or key[:3] not in measured}


def _geomean(values: List[float]) -> Optional[float]:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def best_fused_rows(result: dict) -> List[dict]:
    """Per (case, dtype), the fastest fused row that passed its tolerance."""
    best = {}
    for row in result["rows"]:
        if row["kind"] != "fused" or not row["passed"]:
            continue
        key = (row["case"], row["dtype"])
        if key not in best or row["median_ms"] < best[key]["median_ms"]:
            best[key] = row
    return list(best.values())


def _speedups(rows: List[dict], key: str) -> str:
    values = [r[key] for r in rows if r.get(key)]
    if not values:
        return "-"
    mean = _geomean(values)
    return f"{mean:.2f}× ({min(values):.2f}–{max(values):.2f}×)" if len(values) > 1 else f"{mean:.2f}×"


def _throughput(rows: List[dict]) -> str:
    images = [r["images_per_s"] for r in rows if r.get("images_per_s")]
    peak = [r["peak_memory_pct"] for r in rows if r.get("peak_memory_pct")]
    gbps = [r["gbps"] for r in rows if r.get("gbps")]
    parts = []
    if images and not gbps:  # whole models: images/s is the figure
        parts.append(f"{max(images):.1f} img/s")
    if gbps:
        parts.append(f"{max(gbps):.1f} GB/s" + (f" ({max(peak):.0f}% of copy BW)" if peak else ""))
    return ", ".join(parts) or "-"


def entry_row(path: Path, result: dict, relative_to: Optional[Path] = None) -> List[str]:
    """The cells of one (device, entry) row."""
    best = best_fused_rows(result)
    fused = [r for r in result["rows"] if r["kind"] == "fused"]
    groups = {(r["case"], r["dtype"]) for r in result["rows"]}
    backends = sorted({r["backend"] for r in best if r.get("backend")})
    if not fused:
        ok = "no fused rows"
    elif all(r["passed"] for r in fused):
        ok = "yes"
    else:
        ok = f"**{sum(not r['passed'] for r in fused)} FAILED**"
    shown = path.relative_to(relative_to) if relative_to and path.is_relative_to(relative_to) else path
    return [f"`{result['op']}`", result["date"][:10], ", ".join(result["settings"]["dtypes"]),
            str(len(groups)), ", ".join(backends) or "-", _speedups(best, "speedup_vs_eager"),
            _speedups(best, "speedup_vs_compile"), _throughput(best), ok, f"`{shown}`"]


HEADER = ("entry", "date", "dtypes", "cases", "fastest fused", "vs eager (geomean, range)", "vs torch.compile",
          "best throughput", "all fused within tol.", "JSON")


def _machine(result: dict) -> str:
    device, versions = result["device"], result["versions"]
    text = f"{device['name']} ({device['type']}"
    if device["type"] == "cpu":
        text += f", {device['threads']} threads"
    text += f"), torch {versions['torch']}"
    if versions.get("triton"):
        text += f", triton {versions['triton']}"
    return text + f"; {bandwidth_line(device)}"


def bandwidth_line(device: dict) -> str:
    """'memory bandwidth: measured X GB/s (N MiB copy), datasheet Y GB/s (part)' from a JSON's device."""
    bandwidth = device.get("memory_bandwidth") or {}
    measured = bandwidth.get("measured")
    text = "memory bandwidth: "
    text += (f"measured {measured['gbps']:.0f} GB/s ({measured['copy_bytes'] / 2**20:.0f} MiB copy)"
             if measured else "not measured")
    if bandwidth.get("datasheet_gbps"):
        text += f", datasheet {bandwidth['datasheet_gbps']:.0f} GB/s ({bandwidth['datasheet_part']})"
    return text


def results_markdown(results_dir, relative_to=None) -> str:
    """Markdown: per device (GPUs first), the newest results of every entry, one row each. JSON paths
    are shown relative to ``relative_to`` when given, else as found under ``results_dir``."""
    results_dir = Path(results_dir)
    newest = newest_per_device_and_entry(load_results(results_dir))
    if not newest:
        return f"No stored results under `{results_dir}`."
    devices = sorted({key[:2] for key in newest}, key=lambda d: (d[0] != "cuda", d[1]))
    out = []
    for device in devices:
        entries = sorted((key, value) for key, value in newest.items() if key[:2] == device)
        latest = max(_date(result) for _, (_, result) in entries)
        machine_of_latest = next(r for _, (_, r) in entries if _date(r) == latest)
        out += [f"**{device[1]}** ({device[0]}), newest {latest:%Y-%m-%d}: {_machine(machine_of_latest)}", "",
                "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        for _, (path, result) in entries:
            out.append("| " + " | ".join(entry_row(path, result, relative_to and Path(relative_to))) + " |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def update_readme(readme_path, markdown: str) -> None:
    """Replace the text between ``BEGIN`` and ``END`` in ``readme_path`` with ``markdown``."""
    path = Path(readme_path)
    text = path.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no {BEGIN} ... {END} section")
    path.write_text(text[:start + len(BEGIN)] + "\n" + markdown + text[end:])


__all__ = ["results_markdown", "update_readme", "load_results", "newest_per_device_and_entry",
           "best_fused_rows", "bandwidth_line"]
