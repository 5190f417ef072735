"""The GPU runbook: on a machine with an NVIDIA GPU, everything a lent GPU session should run, in one
command that fits a 10-minute slot, with every output in one folder.

    bash bench/gpu_runbook.sh                       # = python -m fastvit_kernels.bench.runbook
    bash bench/gpu_runbook.sh --dry-run             # the steps, their commands and time limits
    bash bench/gpu_runbook.sh --archive $OUT/gpu.tar.gz   # also pack the folder into one file

Steps, each a subprocess with its own log and time limit, in bench/results/<device>-<date>/:

1. ``nvidia-smi`` (nvidia-smi.txt);
2. build the extension with its CUDA kernels in place, unless one with CUDA already imports (build.log);
3. ``python -m fastvit_kernels.info`` (info.txt), then the diagnostics of ``gpu_probes`` for what
   the last GPU run left unexplained (probes.txt);
4. the whole test suite on the GPU, bfloat16 included: TRITON_INTERPRET is removed from the
   environment, so tests/helpers.py picks the CUDA device and every dtype; one pytest per test file,
   several at a time, so a test that crashes its process costs only itself (``test_files``;
   tests/<file>.xml and .log, tests/crashes.txt);
5. the benchmark CLI on ``cuda`` for every backend that loaded, float32/float16/bfloat16: one run per
   op (its JSON, PNG and log), then the whole models at one batch size (bench-models.log);
6. summary.md: the steps, the test counts and failures, and the results table made from the JSONs.

The time left is shared out as the steps come: a step gets at most its cap and leaves the later steps
their minimum; the benchmark runs get ``--time-budget`` so they stop starting cases in time (the cases
not run are listed in their JSON and in the summary). Exit status: 0 when every step passed, 1 when
one failed or timed out, 2 when there is no GPU or an argument is bad.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from . import summary
from .cases import REGISTRY

ROOT = Path(__file__).resolve().parents[2]  # the repository: setup.py, tests/, bench/
PY = sys.executable
DTYPES = ("float32", "float16", "bfloat16")
# Op cases on CUDA come in batches 1, 8, 64, 256: 8 (the dwconv shapes' batch, latency-bound) and 256
# (bandwidth-bound) show both ends in the time there is.
OP_BATCHES = (8, 256)
# Whole models: one batch size, the most deployed first, timm's and vit-pytorch's interleaved;
# torch.compile of a model takes tens of seconds per dtype, so the time budget decides how many run,
# and they run in float32 and bfloat16 only (float16 runs at bfloat16's speed on these GPUs).
MODEL_BATCH = 64
MODEL_DTYPES = ("bfloat16", "float32")
MODEL_PRIORITY = ("mobilevit_s", "edgenext_small", "levit_256", "vitp_vit", "vitp_cait", "vitp_deepvit",
                  "vitp_cvt", "vitp_pit", "vitp_crossvit", "mobilevit_xxs", "levit_128s", "edgenext_xx_small",
                  "vitp_levit", "vitp_mobilevit", "vitp_distillable_vit", "vitp_t2t")
BENCH_SETTINGS = ("--warmup", "2", "--repeats", "10")
# A case already started runs to its end after the time budget passes: this much is kept back.
OP_CASE_S, MODEL_CASE_S = 20, 90
INTERRUPT_GRACE_S = 10  # after a step's time is up: from Ctrl-C to kill


@dataclass
class Step:
    name: str
    command: List[str]
    cap_s: int  # at most this long
    min_s: int  # not started with less; later steps keep this much back for themselves
    log: str
    env: dict = field(default_factory=dict)
    share: float = 1.0  # of the time left after every later step's minimum, at most cap_s
    status: str = "not run"
    seconds: float = 0.0


def device_slug() -> str:
    if not torch.cuda.is_available():
        return "cuda-no-gpu"
    from .environment import device_slug as slug

    return slug(torch.device("cuda"))


def device_arch() -> str:
    """TORCH_CUDA_ARCH_LIST for the GPU of this machine ("9.0" on an H100/H200); setup.py's default
    when there is none (a dry run)."""
    if not torch.cuda.is_available():
        return os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def op_entries() -> List[str]:
    """Registry entries that are single ops (new ones are picked up on their own)."""
    return [name for name in sorted(REGISTRY) if getattr(REGISTRY[name], "kind", "op") == "op"]


def model_entries() -> List[str]:
    models = [name for name in REGISTRY if getattr(REGISTRY[name], "kind", "op") == "model"]
    return [m for m in MODEL_PRIORITY if m in models] + sorted(m for m in models if m not in MODEL_PRIORITY)


def extension_has_cuda() -> bool:
    """In a subprocess: this process must not load a stale extension before the build replaces it."""
    check = "import fastvit_kernels._C as c, sys; sys.exit(0 if c.has_cuda() else 1)"
    return subprocess.run([PY, "-c", check], cwd=ROOT, capture_output=True).returncode == 0


def make_steps(folder: Path, build: bool) -> List[Step]:
    bench = [PY, "-m", "fastvit_kernels.bench", "--device", "cuda", "--out", str(folder), *BENCH_SETTINGS]
    ops = op_entries()
    # The build targets this GPU only: half the nvcc time of the default two architectures.
    steps = [
        Step("nvidia-smi", ["nvidia-smi"], 30, 5, "nvidia-smi.txt"),
        Step("build", [PY, "setup.py", "build_ext", "--inplace"], 300, 60, "build.log",
             {"FASTVIT_KERNELS_BUILD_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 2),
              "TORCH_CUDA_ARCH_LIST": device_arch()}) if build else None,
        Step("info", [PY, "-m", "fastvit_kernels.info"], 60, 10, "info.txt"),
        Step("probes", [PY, "-m", "fastvit_kernels.bench.gpu_probes"], 90, 10, "probes.txt"),
        Step("tests", [PY, "-m", "fastvit_kernels.bench.test_files", "--out", str(folder / "tests")], 270, 60,
             "tests.log"),
    ]
    steps += [Step(f"bench-{op}", bench + ["--dtype", *DTYPES, "--op", op, "--batch", *map(str, OP_BATCHES)],
                   120, 30, f"bench-{op}.log") for op in ops]
    if model_entries():
        steps.append(Step("bench-models", bench + ["--dtype", *MODEL_DTYPES, "--op", *model_entries(),
                                                   "--batch", str(MODEL_BATCH)],
                          600, MODEL_CASE_S + 10, "bench-models.log"))
    return [s for s in steps if s is not None]


def step_groups(steps: List[Step]) -> dict:
    """Names for sets of steps, for --steps. A lent GPU's first call can run ``setup tests ops`` and
    a second, right after (the machine still warm, the extension still built), ``models``."""
    bench = [s.name for s in steps if s.name.startswith("bench-")]
    return {"setup": ["nvidia-smi", "build", "info", "probes"], "bench": bench,
            "ops": [n for n in bench if n != "bench-models"], "models": ["bench-models"]}


def share_bench_time(steps: List[Step]) -> None:
    """The op benchmarks share 60% of the benchmark time equally and the models get the rest (all of
    it for whichever of the two runs alone): op i of n takes 1 / (ops left + the models' weight in
    ops) of the time left when it starts."""
    ops = [s for s in steps if s.name.startswith("bench-") and s.name != "bench-models"]
    models_weight = len(ops) * 0.4 / 0.6 if any(s.name == "bench-models" for s in steps) else 0.0
    for i, step in enumerate(ops):
        step.share = 1 / (len(ops) - i + models_weight)


def _timeout(steps: List[Step], i: int, left_s: float) -> float:
    """Seconds for step ``i``: its share of the time left (at least its minimum), within its cap and
    leaving every later step its minimum. Below its own minimum it is not started."""
    step = steps[i]
    spare = left_s - sum(s.min_s for s in steps[i + 1:])
    want = max(step.min_s, step.share * left_s) if step.share < 1 else spare
    return max(0.0, min(step.cap_s, spare, want))


def _with_time_budget(step: Step, timeout_s: float) -> List[str]:
    if not step.name.startswith("bench-"):
        return step.command
    keep_back = MODEL_CASE_S if step.name == "bench-models" else OP_CASE_S
    return step.command + ["--time-budget", str(max(1, int(timeout_s - keep_back)))]


def run_step(step: Step, folder: Path, timeout_s: float) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real GPU kernels, bf16 too
    env.update(step.env, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    start = time.monotonic()
    with open(folder / step.log, "w") as log:
        try:
            process = subprocess.Popen(_with_time_budget(step, timeout_s), cwd=ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT)
        except OSError as e:  # e.g. nvidia-smi not on the PATH
            step.status = f"could not start: {e}"
            return
        try:
            code = process.wait(timeout=timeout_s)
            step.status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            # Ctrl-C first: pytest still writes its JUnit XML of the tests that ran.
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=INTERRUPT_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            step.status = f"timed out after {timeout_s:.0f} s"
    step.seconds = time.monotonic() - start


def junit_counts(folder: Path) -> Optional[dict]:
    """tests, failures, errors, skipped and the failed test ids from the JUnit XML files in ``folder``
    (one per test file), with the tests that crashed their process; None when there is none."""
    paths = sorted(folder.glob("*.xml")) if folder.is_dir() else []
    if not paths:
        return None
    counts = {key: 0 for key in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = []
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError:  # cut off mid-write
            continue
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] += sum(int(s.get(key, 0)) for s in suites)
        counts["failed"] += [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                             if case.find("failure") is not None or case.find("error") is not None]
    crashes = folder / "crashes.txt"
    counts["crashed"] = crashes.read_text().splitlines() if crashes.is_file() else []
    not_run = folder / "not_run.txt"
    counts["not_run"] = not_run.read_text().split() if not_run.is_file() else []
    return counts


def not_run_cases(folder: Path) -> List[str]:
    lines = []
    for path, result in summary.load_results(folder):
        count = sum(s["reason"].startswith("not run") for s in result.get("skipped", []))
        if count:
            lines.append(f"- `{result['op']}`: {count} case x dtype jobs not run (time budget)")
    return lines


def write_summary(folder: Path, steps: List[Step], started: datetime.datetime, total_s: float) -> Path:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    lines = [f"# GPU runbook, {name}, {started:%Y-%m-%d %H:%M %Z}", "",
             f"`{' '.join(sys.argv)}` in {total_s:.0f} s; torch {torch.__version__} (CUDA {torch.version.cuda}), "
             f"Python {sys.version.split()[0]}.", "", "| step | status | seconds | log |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} | `{s.log}` |" for s in steps]
    counts = junit_counts(folder / "tests")
    lines += ["", "## Tests", ""]
    if counts is None:
        lines.append("No JUnit XML in tests/ (the tests step did not finish a file).")
    else:
        lines.append(f"{counts['tests']} tests: {counts['failures']} failed, {counts['errors']} errors, "
                     f"{counts['skipped']} skipped, {len(counts['crashed'])} crashed their process.")
        lines += [f"- CRASHED `{test}`" for test in counts["crashed"]]
        lines += [f"- FAILED `{test}`" for test in counts["failed"][:40]]
        if counts["not_run"]:
            lines.append(f"- not run (time limit): {', '.join(counts['not_run'])}")
    lines += ["", "## Benchmarks", "", summary.results_markdown(folder, relative_to=folder)]
    lines += not_run_cases(folder)
    path = folder / "summary.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def archive(folder: Path, target: Optional[Path]) -> None:
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(target, "w:gz") as tar:
            tar.add(folder, arcname=str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else folder.name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastvit_kernels.bench.runbook",
                                     description="Run the GPU test suite and the full benchmark into one folder.")
    parser.add_argument("--budget", type=int, default=540,
                        help="seconds for everything (default: 540, inside a 10-minute slot with room to spare)")
    parser.add_argument("--out-root", type=Path, default=ROOT / "bench" / "results",
                        help="the run's folder is made here (default: bench/results)")
    parser.add_argument("--steps", nargs="+", metavar="NAME",
                        help="run only these steps: names as --dry-run lists them, or the groups setup "
                             "(nvidia-smi, build, info, probes), tests, ops, models, bench (ops and models)")
    parser.add_argument("--archive", type=Path, metavar="FILE.tar.gz",
                        help="also pack the folder into this file after every step")
    parser.add_argument("--dry-run", action="store_true", help="list the steps and their commands; run nothing")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.budget < 60:
        parser.error(f"argument --budget: at least 60 seconds, got {args.budget}")
    if not (ROOT / "setup.py").is_file() or not (ROOT / "tests").is_dir():
        parser.error(f"runs in a checkout of the repository (setup.py, tests/); {ROOT} is not one")
    started = datetime.datetime.now().astimezone()
    folder = args.out_root / f"{device_slug()}-{started:%Y%m%d-%H%M}"
    steps = make_steps(folder, build=args.dry_run or not extension_has_cuda())
    if args.steps:
        groups = step_groups(steps)
        unknown = [n for n in args.steps if n not in groups and n not in {s.name for s in steps}]
        if unknown:
            parser.error(f"argument --steps: unknown {', '.join(unknown)}; the steps are "
                         f"{', '.join(s.name for s in steps)}, or the groups {', '.join(groups)}")
        wanted = set(args.steps).union(*(groups.get(n, ()) for n in args.steps))
        steps = [s for s in steps if s.name in wanted]

    share_bench_time(steps)
    if args.dry_run:
        print(f"folder: {folder}\nbudget: {args.budget} s")
        for s in steps:
            print(f"{s.name}: up to {s.cap_s} s, log {s.log}: {' '.join(s.command)}")
        return 0
    if not torch.cuda.is_available():
        print("gpu runbook: error: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); it needs "
              "a machine with an NVIDIA GPU and a CUDA build of torch. --dry-run lists the steps.", file=sys.stderr)
        return 2

    folder.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    for i, step in enumerate(steps):
        timeout_s = _timeout(steps, i, args.budget - (time.monotonic() - start))
        if timeout_s < step.min_s:
            step.status = f"not run: {timeout_s:.0f} s left of the budget, needs {step.min_s}"
        else:
            run_step(step, folder, timeout_s)
        print(f"[{time.monotonic() - start:4.0f}s] {step.name}: {step.status} ({step.seconds:.0f} s, {step.log})",
              flush=True)
        write_summary(folder, steps, started, time.monotonic() - start)
        archive(folder, args.archive)
    path = write_summary(folder, steps, started, time.monotonic() - start)
    archive(folder, args.archive)
    print(path.read_text())
    return 0 if all(s.status == "ok" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
