"""The test suite one file per pytest process, several at a time, for the GPU runbook: a test that
crashes its process (a segfault in a kernel, an illegal memory access) costs that one test, not the
rest of the suite. pytest-xdist cannot give that: its file scheduler dies with an internal error once
a worker crashes (seen on an H200 on 2026-11-29: half the files never ran).

    python -m fastvit_kernels.bench.test_files --out DIR [--jobs N] [tests/test_x.py ...]

Each file writes ``DIR/<file>.xml`` (JUnit) and ``DIR/<file>.log``. When a file's process dies, the
test it was running (this module, loaded as a pytest plugin, records each test id as it starts) is
written to ``DIR/crashes.txt`` and the file runs again without it, up to ``MAX_CRASHES`` times. The
JUnit XML of a crashed attempt is never written, so no test is counted twice. Ctrl-C (the runbook's
time limit) is passed on to the running files, which still write their XML.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[2]
CURRENT_TEST_ENV = "FASTVIT_KERNELS_CURRENT_TEST"
PLUGIN = "fastvit_kernels.bench.test_files"  # this module, by name (it may run as __main__)
MAX_CRASHES = 3  # per file; a file that crashes more often is left with what it ran


def pytest_runtest_logstart(nodeid, location):  # pytest hook: this module is passed with -p
    path = os.environ.get(CURRENT_TEST_ENV)
    if path:
        with open(path, "w") as f:  # closed (flushed to the OS) before the test runs
            f.write(nodeid)


class FileRun:
    def __init__(self, path: Path, out: Path, extra: List[str]):
        self.path, self.out, self.extra = path, out, extra
        self.deselected: List[str] = []
        self.process = None

    @property
    def stem(self) -> str:
        return self.path.stem

    def start(self) -> None:
        current = self.out / f"{self.stem}.current"
        current.unlink(missing_ok=True)
        command = [sys.executable, "-m", "pytest", "-q", str(self.path), "-p", "no:cacheprovider",
                   "-p", PLUGIN, f"--junitxml={self.out / f'{self.stem}.xml'}", *self.extra]
        command += [arg for nodeid in self.deselected for arg in ("--deselect", nodeid)]
        env = dict(os.environ, **{CURRENT_TEST_ENV: str(current)})
        with open(self.out / f"{self.stem}.log", "a") as log:
            log.write(f"\n$ {' '.join(command)}\n")
            log.flush()
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def crashed_test(self) -> str:
        current = self.out / f"{self.stem}.current"
        return current.read_text() if current.is_file() else f"{self.path} (before its first test)"


def run(files: List[Path], out: Path, jobs: int, extra: List[str]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    # Largest files first: they set how long the whole run takes.
    waiting = sorted((FileRun(f, out, extra) for f in files), key=lambda r: -r.path.stat().st_size)
    running: List[FileRun] = []
    crashes = []
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                running.append(waiting.pop(0))
                running[-1].start()
            time.sleep(0.2)
            for run_ in [r for r in running if r.process.poll() is not None]:
                running.remove(run_)
                code = run_.process.returncode
                if code < 0:  # killed by a signal: the test that was running crashed the process
                    test = run_.crashed_test()
                    crashes.append(f"{test}\t{signal.Signals(-code).name}")
                    (out / "crashes.txt").write_text("".join(c + "\n" for c in crashes))
                    run_.deselected.append(test)
                    if len(run_.deselected) <= MAX_CRASHES:
                        waiting.insert(0, run_)
    except KeyboardInterrupt:
        for run_ in running:
            run_.process.send_signal(signal.SIGINT)
        for run_ in running:
            try:
                run_.process.wait(timeout=8)
            except subprocess.TimeoutExpired:
                run_.process.kill()
        not_run = [r.path.name for r in waiting]
        (out / "not_run.txt").write_text("".join(name + "\n" for name in not_run))
        return 130
    return 1 if crashes else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvit_kernels.bench.test_files",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="test files (default: tests/test_*.py)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the JUnit XML and logs")
    parser.add_argument("--jobs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    parser.add_argument("--pytest-args", nargs=argparse.REMAINDER, default=[],
                        help="passed on to every pytest (last on the command line)")
    args = parser.parse_args(argv)
    files = args.files or sorted((ROOT / "tests").glob("test_*.py"))
    return run(files, args.out, max(1, args.jobs), args.pytest_args)


if __name__ == "__main__":
    sys.exit(main())
