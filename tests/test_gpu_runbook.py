"""The GPU runbook, as far as a machine without a GPU can check it: its steps and the clean refusal."""

import tarfile

import pytest
import torch

from fastvit_kernels.bench import REGISTRY, runbook, test_files


def test_dry_run_lists_every_step(capsys):
    assert runbook.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for step in ("nvidia-smi", "build", "info", "tests", "bench-models"):
        assert f"\n{step}: up to" in out, step
    for name, entry in REGISTRY.items():  # a newly registered op gets its own benchmark step
        assert (f"bench-{name}:" in out) == (entry.kind == "op"), name
    assert "fastvit_kernels.bench.test_files" in out
    assert "--dtype float32 float16 bfloat16" in out and "--device cuda" in out


def test_step_groups_select_steps(capsys):
    assert runbook.main(["--dry-run", "--steps", "setup", "tests", "ops"]) == 0
    listed = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert listed[:5] == ["nvidia-smi", "build", "info", "probes", "tests"]
    assert all(n.startswith("bench-") and n != "bench-models" for n in listed[5:]) and len(listed) > 5
    assert runbook.main(["--dry-run", "--steps", "models"]) == 0
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()[2:]] == ["bench-models"]
    with pytest.raises(SystemExit):
        runbook.main(["--dry-run", "--steps", "nonsense"])


def test_steps_fit_the_budget():
    steps = runbook.make_steps(runbook.ROOT / "bench" / "results" / "x", build=True)
    assert sum(s.min_s for s in steps) < 540
    # Each step's time leaves the later ones their minimum.
    for i in range(len(steps)):
        assert runbook._timeout(steps, i, 540) + sum(s.min_s for s in steps[i + 1:]) <= 540


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_no_gpu_is_a_clear_error(tmp_path, capsys):
    assert runbook.main(["--out-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_junit_counts(tmp_path):
    (tmp_path / "test_a.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.a" name="ok"/><testcase classname="tests.a" name="bad">'
        '<failure message="x"/></testcase><testcase classname="tests.a" name="s"><skipped/></testcase>'
        '</testsuite></testsuites>')
    (tmp_path / "test_b.xml").write_text('<testsuite tests="2" failures="0" errors="1" skipped="0">'
                                         '<testcase classname="tests.b" name="e"><error/></testcase>'
                                         '<testcase classname="tests.b" name="ok"/></testsuite>')
    (tmp_path / "crashes.txt").write_text("tests/test_c.py::test_x[1]\tSIGSEGV\n")
    counts = runbook.junit_counts(tmp_path)
    assert (counts["tests"], counts["failures"], counts["errors"], counts["skipped"]) == (5, 1, 1, 1)
    assert counts["failed"] == ["tests.a::bad", "tests.b::e"]
    assert counts["crashed"] == ["tests/test_c.py::test_x[1]\tSIGSEGV"]
    assert runbook.junit_counts(tmp_path / "missing") is None


def test_a_crashing_test_costs_only_itself(tmp_path):
    """test_files: a test that kills its process is recorded and the file runs on without it."""
    test = tmp_path / "test_crashy.py"
    test.write_text("import os, signal\n"
                    "def test_before(): pass\n"
                    "def test_crash(): os.kill(os.getpid(), signal.SIGSEGV)\n"
                    "def test_after(): pass\n")
    other = tmp_path / "test_fine.py"
    other.write_text("def test_one(): assert 1\n")
    out = tmp_path / "out"
    assert test_files.main([str(test), str(other), "--out", str(out), "--jobs", "2"]) == 1
    counts = runbook.junit_counts(out)
    assert len(counts["crashed"]) == 1 and counts["crashed"][0].endswith("test_crashy.py::test_crash\tSIGSEGV")
    # The rerun ran the other two tests of the crashed file, once each; the other file ran too.
    assert (counts["tests"], counts["failures"], counts["errors"]) == (3, 0, 0)


def test_steps_run_with_time_limits_into_one_folder(tmp_path, monkeypatch):
    """The runbook's driving on stand-in steps: logs, a step stopped at its limit, summary, archive."""
    py = runbook.PY
    steps = [runbook.Step("hello", [py, "-c", "import os; print('hello', os.environ.get('TRITON_INTERPRET'))"],
                          30, 1, "hello.log"),
             runbook.Step("slow", [py, "-c", "import time; time.sleep(60)"], 2, 1, "slow.log")]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(runbook, "make_steps", lambda folder, build: steps)
    monkeypatch.setattr(runbook, "device_slug", lambda: "cuda-stand-in")
    monkeypatch.setattr(runbook, "extension_has_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Stand-in GPU")
    archive = tmp_path / "out" / "gpu.tar.gz"
    assert runbook.main(["--out-root", str(tmp_path), "--budget", "60", "--archive", str(archive)]) == 1
    (folder,) = tmp_path.glob("cuda-stand-in-*")
    assert (folder / "hello.log").read_text() == "hello None\n"  # TRITON_INTERPRET removed
    text = (folder / "summary.md").read_text()
    assert "Stand-in GPU" in text and "| hello | ok |" in text and "| slow | timed out after 2 s |" in text
    with tarfile.open(archive) as tar:
        assert {f"{folder.name}/summary.md", f"{folder.name}/hello.log"} <= set(tar.getnames())
