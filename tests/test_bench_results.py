"""The README's results section is generated from the stored JSONs in bench/results/."""

import json
import shutil
from pathlib import Path

import pytest

from fastvit_kernels.bench import summary
from fastvit_kernels.bench.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _table_rows(markdown):
    return [line for line in markdown.splitlines() if line.startswith("| `")]


def test_a_row_per_stored_device_and_entry():
    stored = summary.load_results(RESULTS)
    assert stored, "bench/results/ holds the project's measured results"
    newest = summary.newest_per_device_and_entry(stored)
    markdown = summary.results_markdown(RESULTS)
    rows = _table_rows(markdown)
    assert len(rows) == len(newest)
    for (device_type, device_name, op, _dtypes, _backends), (path, result) in newest.items():
        assert f"**{device_name}** ({device_type})" in markdown
        assert any(row.startswith(f"| `{op}` |") and path.name in row for row in rows), op


def test_runs_of_other_backends_keep_their_rows(tmp_path):
    """A reference-backend run of a model does not replace its cpu-backend row."""
    cpu = json.loads(sorted(RESULTS.glob("levit_128s_cpu_*.json"))[0].read_text())
    assert cpu["benchmarked_backends"] == ["cpu"]
    reference = dict(cpu, benchmarked_backends=["reference"], date="2099-01-01T00:00:00+00:00")
    (tmp_path / "a.json").write_text(json.dumps(cpu))
    (tmp_path / "b.json").write_text(json.dumps(reference))
    rows = _table_rows(summary.results_markdown(tmp_path, relative_to=tmp_path))
    assert len(rows) == 2 and {"`a.json`", "`b.json`"} == {row.split("|")[-2].strip() for row in rows}


def test_newest_result_of_an_entry_wins(tmp_path):
    old, new = sorted(RESULTS.glob("dwconv_bn_act_cpu_*.json"))[0], tmp_path / "run" / "dwconv_bn_act_cpu_new.json"
    new.parent.mkdir()
    shutil.copy(old, tmp_path / old.name)
    new.write_text(old.read_text().replace('"date": "2026-', '"date": "2099-', 1))
    (row,) = _table_rows(summary.results_markdown(tmp_path, relative_to=tmp_path))
    assert "2099-" in row and "`run/dwconv_bn_act_cpu_new.json`" in row


def test_update_readme_replaces_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{summary.BEGIN}\nstale\n{summary.END}\nafter\n")
    assert main(["--readme-table", str(RESULTS), "--update-readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale" not in text and text.startswith("# x\n\nbefore\n") and text.endswith(f"{summary.END}\nafter\n")
    assert "`dwconv_bn_act`" in text


def test_readme_has_the_generated_section():
    text = (ROOT / "README.md").read_text()
    assert summary.BEGIN in text and summary.END in text


def test_readme_without_markers_is_a_clean_error(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--readme-table", str(RESULTS), "--update-readme", str(readme)])
    assert exit_info.value.code == 2 and "results:begin" in capsys.readouterr().err


def test_a_run_in_other_dtypes_keeps_the_older_row(tmp_path):
    old = sorted(RESULTS.glob("dwconv_bn_act_cpu_*.json"))[0]
    shutil.copy(old, tmp_path / old.name)
    text = old.read_text().replace('"date": "2026-', '"date": "2099-', 1)
    result = json.loads(text)
    result["settings"]["dtypes"] = ["bfloat16"]
    (tmp_path / "dwconv_bn_act_cpu_bf16.json").write_text(json.dumps(result))
    rows = _table_rows(summary.results_markdown(tmp_path, relative_to=tmp_path))
    assert len(rows) == 2 and any(old.name in row for row in rows)
