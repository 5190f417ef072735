"""``python -m fastvit_kernels.bench`` / ``fastvit-bench``: time the fused ops and models against eager
PyTorch.

With no arguments: every registered op and model, on CUDA if there is a GPU (float16, bfloat16,
float32) else on the CPU (float32), every backend that loaded and serves the device. ``--op NAME ...``
picks entries by name (ops and models alike, e.g. ``--op patch_attention mobilevit_s``); ``--quick``
without ``--op`` leaves the whole models out. Prints a progress line per case to stderr and a table at
the end, writes ``<out>/<op>_<device>_<date>.json`` and a PNG plot next to it.

``--replot results.json`` redraws the plot of stored results without running anything;
``--readme-table [DIR]`` prints the README's results section (the newest stored results per device and
entry under DIR, default bench/results) and ``--update-readme README.md`` rewrites that section in place.

The memory bandwidth that op rows are a share of ("% peak BW") is measured once per run by a large
device-to-device copy (:mod:`.bandwidth`); the datasheet figure of A100/H100/H200 is stored beside it.

Exit status: 0, or 1 when a fused row exceeded its error tolerance (baselines that do are reported
but are not our bug), 2 for bad arguments, 130 when interrupted (the results so far are written).
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .. import backends
from . import environment, isolated, report, runner, summary, timing
from .accuracy import RULE
from .bandwidth import measure_copy_bandwidth
from .progress import Progress
from .cases import REGISTRY
from .timing import CUDA_MIN_REPEAT_S, ROTATION_BYTES

PROG = "python -m fastvit_kernels.bench"
FULL_SETTINGS, QUICK_SETTINGS = runner.FULL_SETTINGS, runner.QUICK_SETTINGS


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Benchmark fastvit_kernels' fused ops and models against eager PyTorch and "
                                 "torch.compile.")
    quick_names = [name for name in sorted(REGISTRY) if REGISTRY[name].in_quick_run]
    parser.add_argument("--op", nargs="+", choices=sorted(REGISTRY), metavar="NAME",
                        help=f"ops or models to benchmark, of {', '.join(sorted(REGISTRY))} (default: all; "
                             f"with --quick: {', '.join(quick_names)})")
    parser.add_argument("--backend", nargs="+", choices=backends.BACKENDS + (runner.AUTO,), metavar="NAME",
                        help=f"fused backends to time, of {', '.join(backends.BACKENDS)}, or {runner.AUTO} (no "
                             "preference: each op call takes the first backend that serves it) (default: every "
                             "backend that loaded and serves the device)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(runner.DTYPES), metavar="DTYPE",
                        help="float16, bfloat16, float32 (default: float32 on cpu, all three on cuda)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="default: cuda if a GPU is visible, else cpu")
    parser.add_argument("--quick", action="store_true",
                        help="fewer cases and repeats, and no whole models unless named with --op: a smoke "
                             "run of about a minute")
    parser.add_argument("--out", type=Path, default=Path("bench/results"),
                        help="directory for the JSON results and the plot (default: bench/results)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG plot")
    parser.add_argument("--repeats", type=_positive_int,
                        help=f"timed repeats per variant (default: {FULL_SETTINGS[1]}, "
                             f"{QUICK_SETTINGS[1]} with --quick, fewer for whole models); the median is "
                             "reported")
    parser.add_argument("--warmup", type=_positive_int,
                        help=f"untimed calls per variant first (default: {FULL_SETTINGS[0]}, "
                             f"{QUICK_SETTINGS[0]} with --quick, fewer for whole models)")
    parser.add_argument("--batch", nargs="+", type=_positive_int, metavar="N",
                        help="only the cases of these batch sizes (default: every batch size of the device's "
                             "cases); entries whose cases have none of them are left out")
    parser.add_argument("--time-budget", type=_positive_int, metavar="SECONDS",
                        help="start no new case after this many seconds; the cases not run are listed in the "
                             "JSON (for runs that must fit a time slot, like the GPU runbook)")
    parser.add_argument("--isolate", nargs="?", type=_positive_int, const=1, default=0, metavar="N",
                        help="time each variant in a fresh process of its own, as a user's process runs one "
                             "model (on the CPU eager PyTorch's page faults depend on what the process "
                             "allocated before); slower: every variant rebuilds the case. With N > 1, N "
                             "processes per variant taking turns (torch.compile: one), their repeats pooled")
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help="only redraw the plot of a stored results JSON, then exit")
    parser.add_argument("--readme-table", nargs="?", type=Path, const=Path("bench/results"), metavar="DIR",
                        help="only print the README's results section, made from the newest JSON per device "
                             "and entry under DIR (default: bench/results), then exit")
    parser.add_argument("--update-readme", type=Path, metavar="README",
                        help="with --readme-table: write the section between the results markers of this "
                             "file instead of printing it")
    return parser


def _resolve_device(parser, args) -> torch.device:
    if args.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: 'cuda' requested but no CUDA device is visible to torch")
    return torch.device(args.device)


def _resolve_backends(parser, args, device):
    """The backends to time, and the default ones left out with why (printed, stored in the JSON)."""
    if args.backend is None:
        return runner.default_backends(device)
    for name in args.backend:
        reason = runner.backend_problem(name, device)
        if reason:
            parser.error(f"argument --backend: {name!r} is not available on {device.type}: {reason}")
    return list(dict.fromkeys(args.backend)), {}


def _resolve_dtypes(parser, args, device) -> List[str]:
    dtypes = list(dict.fromkeys(args.dtype or runner.default_dtypes(device)))
    for name in dtypes:
        reason = runner.dtype_problem(name, device)
        if reason:
            parser.error(f"argument --dtype: {name!r} is not supported on {device.type}: {reason}")
    return dtypes


def _resolve_ops(parser, args, device) -> List[str]:
    ops = list(dict.fromkeys(args.op or [name for name in sorted(REGISTRY)
                                         if REGISTRY[name].in_quick_run or not args.quick]))
    if args.batch:
        # Named entries must have a case of the batch size asked for; by default those without one
        # are simply not run.
        having = [op for op in ops if runner.select_cases(REGISTRY[op], args.quick, device, args.batch)]
        missing = [op for op in ops if op not in having]
        if args.op and missing:
            parser.error(f"argument --batch: {', '.join(missing)} has no case of batch size "
                         f"{', '.join(map(str, args.batch))} on {device.type}{' with --quick' if args.quick else ''}")
        ops = having
    return ops


def _readme_table(parser, args) -> int:
    if not args.readme_table.is_dir():
        parser.error(f"argument --readme-table: {str(args.readme_table)!r} is not a directory")
    markdown = summary.results_markdown(args.readme_table)
    if args.update_readme is None:
        print(markdown)
        return 0
    if not args.update_readme.is_file():
        parser.error(f"argument --update-readme: {str(args.update_readme)!r} is not a file")
    try:
        summary.update_readme(args.update_readme, markdown)
    except ValueError as e:
        parser.error(f"argument --update-readme: {e}")
    print(f"updated the results section of {args.update_readme}")
    return 0


def _results_path(out: Path, op: str, device: torch.device, now: datetime.datetime) -> Path:
    stem = f"{op}_{environment.device_slug(device)}_{now:%Y%m%d-%H%M%S}"
    path, n = out / f"{stem}.json", 1
    while path.exists():  # two runs in one second must not overwrite each other
        n += 1
        path = out / f"{stem}-{n}.json"
    return path


def _isolation(processes: int) -> str:
    if processes == 1:
        return "; each variant in a fresh process (--isolate)"
    return (f"; each variant in {processes} fresh processes taking turns, repeats pooled (torch.compile in one) "
            f"(--isolate {processes})")


def run_op(op: str, device, dtypes, backend_names, quick: bool, warmup: int, repeats: int,
           progress: Progress, bandwidth: Optional[dict] = None, batches=None, deadline_s=None,
           isolate: int = 0):
    """Prepare, check and time every case x dtype of ``op``; returns (rows, skipped). Past
    ``deadline_s`` (seconds of ``progress``) the remaining cases are skipped as not run. With
    ``isolate`` > 0 each variant runs in that many fresh processes of its own (``bench.isolated``)."""
    benchmark = REGISTRY[op]
    jobs = [(case, dtype) for case in runner.select_cases(benchmark, quick, device, batches) for dtype in dtypes]
    bandwidth = bandwidth or {}
    rows, skipped = [], []
    for case, dtype in jobs:
        what = f"{op} {case.label} {dtype}"
        reason = None
        if progress.interrupted:
            reason = "not run: interrupted"
        elif deadline_s is not None and progress.elapsed_s() >= deadline_s:
            reason = f"not run: the time budget of {deadline_s} s was used up"
        if reason:
            skipped.append({"op": op, "case": case.label, "dtype": dtype, "impl": "*", "reason": reason})
            progress.end_case(what, reason)
            continue
        progress.start_case(what)
        speed_before = timing.machine_speed_gflops(device)
        try:
            if isolate:
                prepared, timings = isolated.run_isolated(benchmark, case, dtype, device, backend_names, quick,
                                                          warmup, repeats, processes=isolate)
            else:
                # Checked against float64 after timing, as the isolated children do (runner.prepare_case).
                prepared = runner.prepare_case(benchmark, case, runner.DTYPES[dtype], device, backend_names,
                                               check=False)
                timings = runner.time_variants(prepared, warmup, repeats)
                runner.check_against_float64(prepared)
        except runner.CaseSkipped as e:
            skipped.append({"op": op, "case": case.label, "dtype": dtype, "impl": "*", "reason": str(e)})
            progress.end_case(what, f"skipped: {e}")
            continue
        except KeyboardInterrupt:
            # Ctrl-C (or the GPU runbook's time limit): keep what was measured, write it, stop.
            progress.interrupted = True
            skipped.append({"op": op, "case": case.label, "dtype": dtype, "impl": "*",
                            "reason": "not run: interrupted"})
            progress.end_case(what, "interrupted")
            continue
        speed = [speed_before, timing.machine_speed_gflops(device)]
        case_rows = [{**row, "machine_gemm_gflops": speed, "gemm_floor_ms": gemm_floor_ms(row, speed, device)}
                     for row in runner.make_rows(prepared, timings, bandwidth.get("measured_gbps"),
                                                 bandwidth.get("datasheet_gbps"))]
        rows += case_rows
        skipped += runner.skipped_rows(prepared)
        outcome = ", ".join(f"{r['impl']} {r['median_ms']:.3f} ms" + ("" if r["passed"] else " FAIL")
                            for r in case_rows)
        progress.end_case(what, (outcome or "no variant could be timed")
                          + f" (machine GEMM {speed[0]:.0f} -> {speed[1]:.0f} GFLOP/s)")
        del prepared  # the rotated inputs can be large
    return rows, skipped


def gemm_floor_ms(row: dict, probe_gflops: Sequence[float], device: torch.device) -> Optional[float]:
    """The time the row's FLOPs would take at the machine probe's float32 GEMM speed (the faster of
    its two readings): a lower bound for a CPU float32 run whose work is matrix products, as a whole
    model's is. None where it does not apply (no FLOP count, other dtypes, GPUs, whose 512^3 probe is
    far from their peak)."""
    if device.type != "cpu" or row["dtype"] != "float32" or not row.get("flops") or not probe_gflops:
        return None
    return row["flops"] / max(probe_gflops) / 1e6


def _print_results(result: dict, json_path: Path, plot: bool) -> None:
    device = result["device"]
    load = device["load_average_at_start"] if device["type"] == "cpu" else None
    print(f"\n{result['op']} — {device['name']} ({device['type']}, {device['threads']} threads"
          + (f", load average {load[0]:.1f} at start" if load else "")
          + f"), torch {result['versions']['torch']}, median of {result['settings']['repeats']} repeats")
    print(summary.bandwidth_line(device))
    print(report.format_table(result["rows"], result["skipped"]))
    for name, reason in result["backends_left_out"].items():
        print(f"backend {name} not benchmarked: {reason}")
    print(f"results: {json_path}")
    if plot:
        try:
            print(f"plot: {report.plot_speedups(json_path)}")
        except ImportError:
            print("plot skipped: matplotlib is not installed (pip install matplotlib)")


def _report_fused_failures(rows) -> int:
    failed = [r for r in rows if r["kind"] == runner.FUSED and not r["passed"]]
    for r in failed:
        print(f"FAILED correctness: {r['op']} {r['case']} {r['dtype']} {r['impl']}: max error "
              f"{r['max_abs_error']} > tolerance {r['tolerance']:.3g}", file=sys.stderr)
    return len(failed)


def _benchmark_op(op: str, device: torch.device, backend_names, left_out, settings: dict, out: Path,
                  plot: bool, argv, progress: Progress, bandwidth: dict) -> int:
    """Run, store, print and plot one op; returns how many fused rows failed their tolerance."""
    progress.note(f"{op} on {environment.device_name(device)} ({device.type}), "
                  f"dtypes {', '.join(settings['dtypes'])}, backends {', '.join(backend_names) or 'none'}, "
                  f"threads {torch.get_num_threads()}")
    now = datetime.datetime.now().astimezone()
    # Before running: the load average is the machine's, not ours.
    facts = environment.describe(device, bandwidth["measured"])
    load = facts["device"]["load_average_at_start"]
    if device.type == "cpu" and load and load[0] >= 1.0:
        progress.note(f"warning: load average {load[0]:.1f} on {environment.available_cpu_threads()} cores "
                      "before starting: other processes compete for the CPU, timings will be noisy")
    rows, skipped = run_op(op, device, settings["dtypes"], backend_names, settings["quick"],
                           settings["warmup"], settings["repeats"], progress,
                           {"measured_gbps": facts["device"]["peak_memory_gbps"],
                            "datasheet_gbps": facts["device"]["memory_bandwidth"]["datasheet_gbps"]},
                           settings["batches"], settings["time_budget_s"], settings["isolate"])
    result = {
        "op": op,
        "summary": REGISTRY[op].summary,
        "date": now.isoformat(timespec="seconds"),
        "command_line": " ".join([PROG] + [shlex.quote(a) for a in argv]),
        **facts,
        "benchmarked_backends": backend_names,
        "backends_left_out": left_out,
        "settings": {**settings, "rotation_bytes": ROTATION_BYTES, "seed": 0, "grad_mode": "inference_mode",
                     "timer": (f"CUDA events around batches of calls of at least {CUDA_MIN_REPEAT_S * 1e3:g} ms"
                               if device.type == "cuda" else "time.perf_counter around each call")
                              + (_isolation(settings["isolate"]) if settings["isolate"]
                                 else "; the variants' repeats interleaved (round robin)"),
                     "torch_compile": "torch.compile(eager), default mode, compile time excluded",
                     "float64_check": "each variant's output on the first input, against float64 computed after "
                                      "the timing (its frees would change glibc's state for eager variants)",
                     "machine_probe": (f"rows' machine_gemm_gflops: a float32 {timing.PROBE_SIZE}^3 GEMM "
                                       f"({timing.probe_gemm_name(device)}), best of {timing.PROBE_CALLS}, "
                                       "before and after the case"),
                     "gemm_floor": ("rows' gemm_floor_ms (CPU float32 rows with a FLOP count): flops at the faster "
                                    "machine_gemm_gflops reading, a lower bound on the time")},
        "tolerance_rule": RULE,
        "rows": rows,
        "skipped": skipped,
    }
    json_path = report.write_json(result, _results_path(out, op, device, now))
    _print_results(result, json_path, plot)
    return _report_fused_failures(rows)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.update_readme is not None and args.readme_table is None:
        parser.error("argument --update-readme: needs --readme-table")
    if args.readme_table is not None:
        return _readme_table(parser, args)
    if args.replot is not None:
        if not args.replot.is_file():
            parser.error(f"argument --replot: {str(args.replot)!r} is not a file")
        try:
            print(f"plot: {report.plot_speedups(args.replot)}")
        except ImportError:
            print("plot skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
            return 1
        return 0

    device = _resolve_device(parser, args)
    dtypes = _resolve_dtypes(parser, args, device)
    backend_names, left_out = _resolve_backends(parser, args, device)
    ops = _resolve_ops(parser, args, device)

    if device.type == "cpu":
        torch.set_num_threads(environment.available_cpu_threads())
    progress = Progress(sum(len(runner.select_cases(REGISTRY[op], args.quick, device, args.batch))
                            for op in ops) * len(dtypes))
    for name, reason in left_out.items():
        progress.note(f"backend {name} skipped: {reason}")
    bandwidth = {"measured": measure_copy_bandwidth(device)}  # once per run: the roofline's ceiling
    progress.note(f"memory bandwidth of {environment.device_name(device)}: "
                  f"{bandwidth['measured']['gbps']:.0f} GB/s measured by a "
                  f"{bandwidth['measured']['copy_bytes'] / 2**20:.0f} MiB copy")

    # Seeded for repeatable inputs, without changing the RNG state of a caller running main() in-process.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        fused_failures = 0
        for op in ops:
            warmup, repeats = runner.settings_for(REGISTRY[op], args.quick, args.warmup, args.repeats)
            settings = {"quick": args.quick, "dtypes": dtypes, "warmup": warmup, "repeats": repeats,
                        "batches": args.batch, "time_budget_s": args.time_budget, "isolate": args.isolate}
            fused_failures += _benchmark_op(op, device, backend_names, left_out, settings, args.out,
                                            not args.no_plot, argv, progress, bandwidth)
            if progress.interrupted:
                return 130  # the shell's status for Ctrl-C
    return 1 if fused_failures else 0


if __name__ == "__main__":
    sys.exit(main())
