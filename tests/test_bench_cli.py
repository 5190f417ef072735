"""The benchmark CLI: a quick run on the CPU writes checked results, bad arguments fail cleanly."""

import json

import pytest
import torch

from fastvit_kernels import backends
from fastvit_kernels.bench import plot_speedups, runner
from fastvit_kernels.bench.__main__ import main

TIMES = ("median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms")
THROUGHPUTS = ("speedup_vs_eager", "speedup_vs_compile", "gbps", "gflops")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick CPU run shared by the tests below: (exit code, results JSON path, output dir)."""
    out = tmp_path_factory.mktemp("bench")
    code = main(["--quick", "--device", "cpu", "--repeats", "3", "--out", str(out)])
    return code, sorted(out.glob("dwconv_bn_act_cpu_*.json")), out


def test_quick_run_exits_zero_and_writes_one_json(quick_run):
    code, json_paths, _ = quick_run
    assert code == 0
    assert len(json_paths) == 1, json_paths


def test_json_records_where_and_how_it_ran(quick_run):
    result = json.loads(quick_run[1][0].read_text())
    assert result["op"] == "dwconv_bn_act"
    assert result["device"]["type"] == "cpu" and result["device"]["name"]
    assert result["device"]["threads"] == torch.get_num_threads() >= 1
    for name in ("torch", "triton", "python", "fastvit_kernels"):
        assert name in result["versions"]
    assert result["versions"]["torch"] == torch.__version__
    assert result["date"]
    assert result["command_line"].startswith("python -m fastvit_kernels.bench")
    assert "--quick" in result["command_line"]
    assert set(result["backends"]) == set(backends.BACKENDS)
    assert "reference" in result["benchmarked_backends"]


def test_rows_cover_the_quick_cases_and_backends(quick_run):
    result = json.loads(quick_run[1][0].read_text())
    rows = result["rows"]
    cases = {r["case"] for r in rows}
    for shape in ("8x128x64x64 ", "8x576x14x14 "):
        assert any(c.startswith(shape) for c in cases), (shape, cases)
    assert {r["params"]["stride"] for r in rows} == {1, 2}
    impls = {r["impl"] for r in rows} | {s["impl"] for s in result["skipped"]}
    fused = {f"fused-{b}" for b in result["benchmarked_backends"]}
    assert {"eager", "eager-folded", "torch.compile"} | fused <= impls
    # Every fused backend that was benchmarked produced rows (a skip would hide a broken backend).
    assert fused <= {r["impl"] for r in rows}


def test_every_figure_positive_and_every_error_within_tolerance(quick_run):
    rows = json.loads(quick_run[1][0].read_text())["rows"]
    assert rows
    for r in rows:
        where = f"{r['case']} {r['dtype']} {r['impl']}"
        for key in TIMES + THROUGHPUTS:
            if key == "speedup_vs_compile" and r[key] is None:  # torch.compile may be skipped
                continue
            assert r[key] is not None and r[key] > 0, f"{where}: {key} = {r[key]}"
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"], where
        assert r["max_abs_error"] is not None and r["max_abs_error"] <= r["tolerance"], where
        assert r["passed"], where


def test_plot_written_and_redrawn_from_json(quick_run, tmp_path):
    _, json_paths, _ = quick_run
    png = json_paths[0].with_suffix(".png")
    assert png.is_file() and png.stat().st_size > 0
    redrawn = plot_speedups(json_paths[0], tmp_path / "again.png")
    assert redrawn.is_file() and redrawn.stat().st_size > 0


def test_unavailable_default_backend_is_left_out_with_its_reason(monkeypatch):
    real = backends.load_error
    simulated = "import fastvit_kernels._C failed (simulated)"
    monkeypatch.setattr(backends, "load_error", lambda name: simulated if name == "cpu" else real(name))
    chosen, left_out = runner.default_backends(torch.device("cpu"))
    assert "cpu" not in chosen and "reference" in chosen
    assert "simulated" in left_out["cpu"]


BAD_ARGUMENTS = {
    "unknown op": (["--op", "no_such_op"], "no_such_op"),
    "unknown backend": (["--backend", "no_such_backend"], "no_such_backend"),
    "backend not serving the device": (["--device", "cpu", "--backend", "cuda"], "cuda"),
    "triton on cpu": (["--device", "cpu", "--backend", "triton"], "triton"),
    "unsupported dtype": (["--dtype", "int8"], "int8"),
    "zero repeats": (["--repeats", "0"], "--repeats"),
    "missing replot file": (["--replot", "/nonexistent/results.json"], "--replot"),
}
if not torch.cuda.is_available():
    BAD_ARGUMENTS["cuda device without a GPU"] = (["--device", "cuda"], "--device")


@pytest.mark.parametrize("argv,mentions", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_give_a_message_and_nonzero_exit(argv, mentions, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--out", str(tmp_path)])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "error:" in err and mentions in err, err
    assert "Traceback" not in err
    assert not list(tmp_path.iterdir()), "nothing is written for bad arguments"
