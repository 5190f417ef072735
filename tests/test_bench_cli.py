"""The benchmark CLI: a quick run on the CPU writes checked results, bad arguments fail cleanly."""

import importlib
import inspect
import io
import json
import math
from pathlib import Path

import pytest
import torch

from fastvit_kernels import backends
from fastvit_kernels.bench import REGISTRY, plot_speedups, report, runner
from fastvit_kernels.bench.__main__ import gemm_floor_ms, main, run_op
from fastvit_kernels.bench.bandwidth import datasheet_memory_bandwidth, measure_copy_bandwidth
from fastvit_kernels.bench.progress import Progress
from fastvit_kernels.bench.cases import UnfoldAttentionFold, model_case, timm_fold, timm_unfold

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


def test_rows_record_the_machine_speed_around_their_case(quick_run):
    rows = json.loads(quick_run[1][0].read_text())["rows"]
    assert all(len(r["machine_gemm_gflops"]) == 2 and min(r["machine_gemm_gflops"]) > 0 for r in rows)
    # One probe pair per case: the rows of a case share it.
    by_case = {}
    for r in rows:
        by_case.setdefault((r["case"], r["dtype"]), set()).add(tuple(r["machine_gemm_gflops"]))
    assert all(len(pairs) == 1 for pairs in by_case.values())


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


# --------------------------------------------------------------------------------------------------
# patch_attention and the whole-model entries.
# --------------------------------------------------------------------------------------------------

MODELS = ("mobilevit_xxs", "mobilevit_xs", "mobilevit_s")


def test_quick_run_has_patch_attention_and_no_models(quick_run):
    _, _, out = quick_run
    assert len(list(out.glob("patch_attention_cpu_*.json"))) == 1
    assert not list(out.glob("mobilevit*")), "whole models are not part of --quick unless named"


def test_patch_attention_quick_rows_positive_and_within_tolerance(quick_run):
    (json_path,) = quick_run[2].glob("patch_attention_cpu_*.json")
    result = json.loads(json_path.read_text())
    rows = result["rows"]
    assert {r["case"] for r in rows} == {"S 1x32x32x144 h4 p2x2"}
    impls = {r["impl"] for r in rows}
    fused = {f"fused-{b}" for b in result["benchmarked_backends"]}
    assert {"eager", "sdpa+unfold"} | fused <= impls
    for r in rows:
        where = f"{r['case']} {r['impl']}"
        for key in TIMES + THROUGHPUTS + ("images_per_s",):
            if key == "speedup_vs_compile" and r[key] is None:
                continue
            assert r[key] is not None and r[key] > 0, f"{where}: {key} = {r[key]}"
        assert r["max_abs_error"] is not None and r["max_abs_error"] <= r["tolerance"], where
        assert r["passed"], where
        # qkv read + out written; 4 * B * P * heads * N^2 * head_dim
        assert r["min_bytes"] == (1 * 32 * 32 * 144 * 4) * 4
        assert r["flops"] == 4 * 1 * 4 * 4 * 256 ** 2 * 36
        assert math.isclose(r["images_per_s"], 1e3 / r["median_ms"])


def test_patch_attention_cases_per_device():
    entry = REGISTRY["patch_attention"]
    (quick,) = entry.cases(True, torch.device("cpu"))
    assert quick.params["batch"] == 1 and quick.params["channels"] == 144 and quick.params["height"] == 32
    cpu, cuda = entry.cases(False, torch.device("cpu")), entry.cases(False, torch.device("cuda"))
    assert len(cpu) == 9 * 2 and {c.params["batch"] for c in cpu} == {1, 8}
    assert len(cuda) == 9 * 4 and {c.params["batch"] for c in cuda} == {1, 8, 64, 256}
    assert len({c.label for c in cuda}) == len(cuda)


def test_patch_attention_eager_unfolds_as_timm_and_matches_the_op():
    torch.manual_seed(0)
    B, H, W, C, heads, (ph, pw) = 2, 8, 6, 12, 3, (2, 2)
    x = torch.randn(B, H, W, C, dtype=torch.float64)
    # timm MobileVitBlock.forward's unfold, on the NCHW map.
    nchw, nh, nw, P, N = x.permute(0, 3, 1, 2).contiguous(), H // ph, W // pw, ph * pw, (H // ph) * (W // pw)
    t = nchw.reshape(B * C * nh, ph, nw, pw).transpose(1, 2)
    timm_tokens = t.reshape(B, C, N, P).transpose(1, 3).reshape(B * P, N, -1)
    assert torch.equal(timm_unfold(x, (ph, pw)), timm_tokens)
    assert torch.equal(timm_fold(timm_tokens, (B, H, W), (ph, pw)), x)

    qkv = torch.randn(B, H, W, 3 * C, dtype=torch.float64)
    # The op's docstring equivalent.
    d = C // heads
    q, k, v = qkv.reshape(B, nh, ph, nw, pw, 3, heads, d).permute(5, 0, 2, 4, 6, 1, 3, 7).reshape(
        3, B * P, heads, N, d)
    o = torch.softmax(d ** -0.5 * q @ k.transpose(-1, -2), dim=-1) @ v
    expected = o.reshape(B, ph, pw, heads, nh, nw, d).permute(0, 4, 1, 5, 2, 3, 6).reshape(B, H, W, C)
    for sdpa in (False, True):
        out = UnfoldAttentionFold(heads, (ph, pw), d ** -0.5, sdpa=sdpa)(qkv)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_model_entries_are_named_and_left_out_of_quick():
    for name in MODELS:
        entry = REGISTRY[name]
        assert not entry.in_quick_run
        (cpu_case,) = entry.cases(False, torch.device("cpu"))
        assert cpu_case.params == {"model": name, "batch": 8, "input_size": [3, 256, 256]}
        assert [c.params["batch"] for c in entry.cases(False, torch.device("cuda"))] == [8, 64, 256]
        assert entry.min_bytes(cpu_case, 4) is None
        # Fewer calls than an op, unless asked for.
        assert runner.settings_for(entry, quick=False) == (1, 5)
        assert runner.settings_for(entry, quick=False, warmup=2, repeats=7) == (2, 7)
    assert runner.settings_for(REGISTRY["patch_attention"], quick=False) == runner.FULL_SETTINGS


def test_model_fused_matches_timm_through_the_runner():
    """mobilevit_xxs at batch 1, 64x64 (cheap): timm eager vs create_model with its weights, checked
    against float64 by the runner, then one timed call per variant for the row's images/s."""
    entry = REGISTRY["mobilevit_xxs"]
    case = model_case("mobilevit_xxs", 1, (3, 64, 64))
    torch.manual_seed(0)
    module = entry.build_module(case)
    bn = module.stem.bn
    assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var)), "BN stats are randomized"
    names, _ = runner.default_backends(torch.device("cpu"))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        prepared = runner.prepare_case(entry, case, torch.float32, torch.device("cpu"), names, use_compile=False)
    assert not prepared.skipped, prepared.skipped
    assert prepared.errors["eager"] < 1e-5
    for name in names:
        assert prepared.errors[f"fused-{name}"] <= prepared.tolerance, (name, prepared.errors)
    prepared.inputs = prepared.inputs[:2]
    rows = runner.make_rows(prepared, runner.time_variants(prepared, warmup=1, repeats=1))
    assert {r["impl"] for r in rows} == {"eager"} | {f"fused-{n}" for n in names}
    for r in rows:
        assert r["images_per_s"] > 0 and r["gbps"] is None and r["gflops"] > 0 and r["passed"]
    assert "img/s" in report.format_table(rows)


def test_model_flops_are_the_published_count_times_the_batch():
    """LeViT-128S: 305 M multiply-adds an image at 224x224 (Graham et al. 2021, Table 1's "FLOPs")."""
    entry = REGISTRY["levit_128s"]
    one, eight = model_case("levit_128s", 1, (3, 224, 224)), model_case("levit_128s", 8, (3, 224, 224))
    assert entry.flops(one) / 2 == pytest.approx(305e6, rel=0.005)
    assert entry.flops(eight) == 8 * entry.flops(one)
    # counted per input size, not once per model name: a 64x64 image is ~1/16 of a 256x256 one
    mobilevit = REGISTRY["mobilevit_xxs"]
    large, small = (mobilevit.flops(model_case("mobilevit_xxs", 1, (3, s, s))) for s in (256, 64))
    assert 12 < large / small < 20


def test_gemm_floor_is_the_flops_at_the_faster_probe_reading_on_cpu_float32_only():
    row = {"dtype": "float32", "flops": 4e9}
    assert gemm_floor_ms(row, [100.0, 125.0], torch.device("cpu")) == pytest.approx(32.0)
    assert gemm_floor_ms({**row, "dtype": "bfloat16"}, [125.0], torch.device("cpu")) is None
    assert gemm_floor_ms({**row, "flops": None}, [125.0], torch.device("cpu")) is None
    assert gemm_floor_ms(row, [125.0], torch.device("cuda")) is None
    table_row = {"case": "c", "dtype": "float32", "impl": "eager", "median_ms": 40.0, "q1_ms": 39.0,
                 "q3_ms": 41.0, "speedup_vs_eager": 1.0, "speedup_vs_compile": None, "gbps": None,
                 "gflops": 100.0, "peak_memory_pct": None, "max_abs_error": 0.0, "tolerance": 1e-6,
                 "passed": True}
    assert "GEMM floor ms" not in report.format_table([table_row])
    assert "32.0" in report.format_table([{**table_row, "gemm_floor_ms": 32.0}]).splitlines()[2]


def test_cpu_name_carries_the_vector_isa():
    from fastvit_kernels.bench.environment import cpu_name

    assert cpu_name().endswith(f"{torch.backends.cpu.get_cpu_capability()})")


@pytest.mark.parametrize("gemm", ["mkl", "onednn"])
def test_cpu_probe_times_the_gemm_the_linears_take(monkeypatch, gemm):
    from fastvit_kernels.bench import timing

    if gemm == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setenv("FASTVIT_KERNELS_CPU_GEMM", gemm)
    expected = "oneDNN inner product" if gemm == "onednn" else "torch.mm"
    assert timing.probe_gemm_name(torch.device("cpu")) == expected
    assert 0 < timing.machine_speed_gflops(torch.device("cpu")) < math.inf


def test_unknown_name_lists_the_available_ops_and_models(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--op", "mobilevit_xxl", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "mobilevit_xxl" in err and "Traceback" not in err
    for name in ("dwconv_bn_act", "patch_attention") + MODELS:
        assert name in err, err


@pytest.mark.parametrize("op", ["xca_attention", "bias_attention"])
def test_attention_op_entries_check_fused_against_float64(op):
    """The XCA and LeViT op entries: eager (timm's core) and ours agree within tolerance, checked by
    the runner on the first case, without compile; left out of --quick."""
    entry = REGISTRY[op]
    assert entry.in_quick_run is False
    (case,) = entry.cases(True, torch.device("cpu"))
    names, _ = runner.default_backends(torch.device("cpu"))
    prepared = runner.prepare_case(entry, case, torch.float32, torch.device("cpu"), names, use_compile=False)
    assert not prepared.skipped, prepared.skipped
    for name in names:
        assert prepared.errors[f"fused-{name}"] <= prepared.tolerance, (name, prepared.errors)
    assert entry.flops(case) > 0 and entry.min_bytes(case, 4) > 0


# --------------------------------------------------------------------------------------------------
# Memory bandwidth (the roofline's ceiling), progress, argument checks, console script.
# --------------------------------------------------------------------------------------------------

DATASHEET_NAMES = {
    "NVIDIA A100-SXM4-40GB": 1555.0, "NVIDIA A100-PCIE-40GB": 1555.0, "NVIDIA A100-SXM4-80GB": 2039.0,
    "NVIDIA A100 80GB PCIe": 1935.0, "NVIDIA H100 80GB HBM3": 3350.0, "NVIDIA H100 PCIe": 2000.0,
    "NVIDIA H100 NVL": 3900.0, "NVIDIA H200": 4800.0, "NVIDIA H200 NVL": 4800.0,
}


@pytest.mark.parametrize("name,gbps", DATASHEET_NAMES.items())
def test_datasheet_bandwidth_matches_torch_device_names(name, gbps):
    figure, part = datasheet_memory_bandwidth(name)
    assert figure == gbps and part


@pytest.mark.parametrize("name", ["NVIDIA GH200 480GB", "NVIDIA GeForce RTX 4090", "AMD EPYC 7B13", ""])
def test_datasheet_bandwidth_unknown_device_is_none(name):
    assert datasheet_memory_bandwidth(name) is None


def test_measured_copy_bandwidth_on_cpu():
    measured = measure_copy_bandwidth(torch.device("cpu"), nbytes=8 * 2**20, repeats=3)
    assert measured["copy_bytes"] == 8 * 2**20 and measured["repeats"] == 3
    assert 0 < measured["min_gbps"] <= measured["gbps"] <= measured["max_gbps"]


def test_json_stores_measured_bandwidth_and_op_rows_share_of_it(quick_run):
    result = json.loads(quick_run[1][0].read_text())
    bandwidth = result["device"]["memory_bandwidth"]
    assert bandwidth["measured"]["gbps"] > 0 and bandwidth["measured"]["copy_bytes"] > 0
    assert result["device"]["peak_memory_gbps"] == bandwidth["measured"]["gbps"]
    assert "datasheet_gbps" in bandwidth  # None on a CPU
    for r in result["rows"]:
        assert math.isclose(r["peak_memory_pct"], 100 * r["gbps"] / bandwidth["measured"]["gbps"])


def test_progress_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    progress = Progress(2, stream=stream, tty=False)
    progress.start_case("op a float32")
    progress.end_case("op a float32", "eager 1.0 ms")
    progress.note("next op")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and "\033" not in stream.getvalue()
    assert lines[0].startswith("[1/2]") and lines[0].endswith("op a float32: running")
    assert lines[1].startswith("[1/2]") and lines[1].endswith("eager 1.0 ms") and lines[2] == "next op"


def test_progress_redraws_one_line_on_a_terminal():
    stream = io.StringIO()
    progress = Progress(4, stream=stream, tty=True)
    progress.start_case("x")
    progress.end_case("x", "done")
    progress.start_case("y")
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1  # the finished case stays, the bar redraws
    assert "#####" in text.split("\n")[-1]  # 1 of 4 done: a quarter of the bar


def test_time_budget_leaves_cases_listed_as_not_run():
    names, _ = runner.default_backends(torch.device("cpu"))
    progress = Progress(99, stream=io.StringIO(), tty=False)
    rows, skipped = run_op("dwconv_bn_act", torch.device("cpu"), ["float32"], names, True, 1, 1, progress,
                           deadline_s=0)
    assert rows == [] and len(skipped) == len(REGISTRY["dwconv_bn_act"].cases(True, torch.device("cpu")))
    assert all(s["reason"].startswith("not run: the time budget") for s in skipped)


def test_isolate_times_each_variant_in_its_own_process(monkeypatch):
    """--isolate 2: the same rows as in-process timing (every variant, checked and within tolerance),
    measured by children, two per variant but torch.compile; a child that fails is reported as
    skipped, not raised."""
    from fastvit_kernels.bench import isolated

    cpu = torch.device("cpu")
    benchmark = REGISTRY["xca_attention"]
    case = runner.select_cases(benchmark, True, cpu)[0]
    prepared, timings = isolated.run_isolated(benchmark, case, "float32", cpu, ["cpu", "nonexistent"], True, 1, 2,
                                              processes=2)
    rows = runner.make_rows(prepared, timings)
    assert [r["impl"] for r in rows] == ["eager", "torch.compile", "fused-cpu"]  # prepare_case's order
    assert all(r["passed"] and r["median_ms"] > 0 for r in rows)
    # Two processes each for eager and fused, their 2 repeats pooled; torch.compile compiled once.
    assert [r["repeats"] for r in rows] == [4, 2, 4]
    assert prepared.compile_s and prepared.compile_s > 0
    assert "fused-nonexistent" in prepared.skipped and "fused-nonexistent" not in timings


def test_isolated_child_times_before_the_float64_check(monkeypatch):
    """The float64 forward frees large blocks (glibc then keeps its pages for the eager model timed
    after it): an isolated child times its variant first, then checks it."""
    from fastvit_kernels.bench import isolated

    calls = []
    real_time, real_check = runner.time_variants, runner.check_against_float64

    def time_variants(prepared, *args):
        calls.append(("time", dict(prepared.errors)))
        return real_time(prepared, *args)

    def check(prepared):
        calls.append(("check", None))
        real_check(prepared)

    monkeypatch.setattr(runner, "time_variants", time_variants)
    monkeypatch.setattr(runner, "check_against_float64", check)
    case = runner.select_cases(REGISTRY["xca_attention"], True, torch.device("cpu"))[0]
    result = isolated._child("xca_attention", case.label, "float32", "fused-cpu", 1, 2, True, torch.device("cpu"))
    assert [name for name, _ in calls] == ["time", "check"]
    assert calls[0][1] == {}, "errors were computed before timing"
    assert result["error"] is not None and result["error"] <= result["tolerance"] and len(result["per_call_s"]) == 2


def test_variant_names_are_prepare_cases_variants_in_order():
    """--isolate and pytest-benchmark name the variants by runner.variant_names; prepare_case builds them."""
    cpu = torch.device("cpu")
    for op in ("xca_attention", "bias_attention"):  # bias_attention has an extra eager baseline (SDPA)
        benchmark = REGISTRY[op]
        prepared = runner.prepare_case(benchmark, runner.select_cases(benchmark, True, cpu)[0], torch.float32, cpu,
                                       ["cpu", "reference"])
        assert [v.name for v in prepared.variants] == runner.variant_names(benchmark, ["cpu", "reference"])


def test_batch_filter_keeps_cases_of_those_batches():
    cpu = torch.device("cpu")
    cases = runner.select_cases(REGISTRY["xca_attention"], False, cpu, [8])
    assert cases and {c.params["batch"] for c in cases} == {8}
    assert {runner.case_batch(c) for c in REGISTRY["dwconv_bn_act"].cases(False, cpu)} == {8}  # N of the shape
    assert runner.select_cases(REGISTRY["dwconv_bn_act"], False, cpu, [64]) == []


def test_dtype_unsupported_on_the_device_is_a_clean_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(runner, "dtype_problem",
                        lambda name, device: "not on this machine (simulated)" if name == "float16" else None)
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cpu", "--dtype", "float16", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--dtype" in err and "float16" in err and "simulated" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_bfloat16_refused_before_ampere(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    cuda = torch.device("cuda")
    assert "bfloat16" in runner.dtype_problem("bfloat16", cuda) and "Tesla T4" in runner.dtype_problem("bfloat16", cuda)
    assert runner.dtype_problem("float16", cuda) is None
    assert runner.dtype_problem("bfloat16", torch.device("cpu")) is None


def test_named_entry_without_that_batch_is_a_clean_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--op", "dwconv_bn_act", "--batch", "64", "--device", "cpu", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--batch" in err and "dwconv_bn_act" in err and "Traceback" not in err


def test_console_script_points_at_main():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    module, _, function = pyproject["project"]["scripts"]["fastvit-bench"].partition(":")
    target = getattr(importlib.import_module(module), function)
    assert target is main
    # The generated script calls sys.exit(main()) with no arguments: every parameter has a default.
    assert all(p.default is not inspect.Parameter.empty for p in inspect.signature(main).parameters.values())


def test_auto_variant_runs_what_no_named_kernel_backend_serves():
    """``--backend auto``: the fused model with no preference, as users run it. T2T-ViT's 147-wide
    heads are refused by the named ``cpu`` backend (that row is skipped with the reason); ``auto``
    sends them to the reference and the rest to the kernels, and is checked like any fused row."""
    from fastvit_kernels.bench import vit_family_cases

    if "vitp_t2t" not in REGISTRY:
        pytest.skip("vit-pytorch is not installed")
    entry = REGISTRY["vitp_t2t"]
    (case,) = [c for c in entry.cases(True, torch.device("cpu"))]
    case.params["batch"] = 1
    cpu = torch.device("cpu")
    prepared = runner.prepare_case(entry, case, torch.float32, cpu, ["cpu", runner.AUTO], use_compile=False)
    assert "head dim" in prepared.skipped["fused-cpu"] and "147" in prepared.skipped["fused-cpu"]
    assert prepared.errors["fused-auto"] <= prepared.tolerance
    prepared.inputs = prepared.inputs[:1]
    rows = runner.make_rows(prepared, runner.time_variants(prepared, warmup=0, repeats=1))
    (auto,) = [r for r in rows if r["impl"] == "fused-auto"]
    assert auto["backend"] == runner.AUTO and auto["kind"] == runner.FUSED and auto["passed"]
    assert vit_family_cases.VIT_FAMILY_BENCHMARKS["vitp_t2t"][1] == "T2TViT"


def test_round_robin_timing_interleaves_the_variants_and_drops_the_failing_one():
    """Repeat r runs every variant once, in an order rotated by r, each inside its own context; a
    variant that raises is reported and leaves the others timed."""
    import contextlib

    from fastvit_kernels.bench.timing import measure_round_robin

    calls, entered = [], []

    def variant(name, fail_at=None):
        def fn(x):
            calls.append(name)
            if fail_at is not None and calls.count(name) == fail_at:
                raise RuntimeError(f"{name} broke")
        return fn

    def context(name):
        return lambda: contextlib.nullcontext(entered.append(name))

    variants = {n: (variant(n, 3 if n == "c" else None), context(n)) for n in "abc"}
    timings, failed = measure_round_robin(variants, [torch.zeros(1)], torch.device("cpu"), warmup=1, repeats=3)
    assert set(timings) == {"a", "b"} and [len(t.per_call_s) for t in timings.values()] == [3, 3]
    assert str(failed["c"]) == "c broke"
    # Warm-up a b c; round 0: a b c; round 1 (rotated by 1): b c a, c raising on its third call;
    # round 2: a b (c dropped; [a, b] rotated by 2).
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "a", "b"]
    assert entered == calls
