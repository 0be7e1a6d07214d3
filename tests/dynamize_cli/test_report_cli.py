"""`dynamize report` through the real CLI entry point: several runs, defaults, and bad input."""
import json

import pytest
import timm
from helpers import make_image_folder, make_runs

import dynamize
from dynamize_cli.main import run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("runs"))


def _files(path):
    return sorted(p.relative_to(path) for p in path.rglob("*"))


def test_several_runs_give_one_comparison_sorted_by_flops(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["report", str(runs["run"]), str(runs["teacher_run"]), "--data", str(runs["data"]),
                "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    comparison = printed[printed.index("comparison, by FLOPs"):]
    assert comparison.index("tuned") < comparison.index("converted")
    assert "2 x multiply-accumulates" in printed
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["tuned", "converted"]
    assert report["runs"][1]["flops"]["mean_fraction"] > 1.0  # open gates: the original plus the gates' cost
    assert (out / report["plots"]["accuracy_vs_flops"]).is_file()
    assert "## Comparison" in (out / "report.md").read_text()


def test_static_report_of_latest_run_in_default_place(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(runs["run"].parent.parent)  # holds runs/converted and runs/tuned
    assert run(["report", "--static"]) == 0
    printed = capsys.readouterr().out
    assert "plan and FLOPs accounting" in printed
    report = json.loads((runs["run"].parent.parent / "reports" / "tuned-static" / "report.json").read_text())
    assert report["kind"] == "static" and report["runs"][0]["name"] == "tuned"


def _bad_inputs(runs, tmp_path):
    four = make_image_folder(tmp_path / "four", classes=4, per_class=2)
    (tmp_path / "file").write_text("x")
    return {
        "no runs": (["report"], "no run directory"),
        "no data recorded": (["report", str(runs["teacher_run"])], "--data"),
        "class count": (["report", str(runs["run"]), "--data", str(four)], "4 classes"),
        "missing data": (["report", str(runs["run"]), "--data", str(tmp_path / "nowhere")], "does not exist"),
        "not a run": (["report", str(tmp_path)], "config.json"),
        "output is a file": (["report", str(runs["run"]), "--static", "-o", str(tmp_path / "file")],
                             "not a directory"),
    }


@pytest.mark.parametrize("case", ["no runs", "no data recorded", "class count", "missing data", "not a run",
                                  "output is a file"])
def test_bad_input_is_one_line_and_exit_2(case, runs, tmp_path, monkeypatch, capsys):
    argv, needle = _bad_inputs(runs, tmp_path)[case]
    monkeypatch.chdir(tmp_path)
    before, runs_before = _files(tmp_path), _files(runs["run"].parent.parent)
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert needle in err
    assert _files(tmp_path) == before and _files(runs["run"].parent.parent) == runs_before


def test_latency_is_measured_when_asked(runs, tmp_path):
    out = tmp_path / "rep"
    assert run(["report", str(runs["run"]), "--data", str(runs["data"]), "--limit", "8", "--latency",
                "-o", str(out)]) == 0
    latency = json.loads((out / "report.json").read_text())["runs"][0]["latency"]
    assert [r["batch_size"] for r in latency] == [1, 32]
    assert all(r["dense_ms"] > 0 and r["dynamic_ms"] > 0 and 0 < r["fraction"] <= 1.1 for r in latency)


@pytest.mark.parametrize("kinds", ["layer", "channel"])
def test_a_one_kind_run_is_labelled_with_the_gates_it_trained(kinds, tmp_path):
    net = dynamize.convert(timm.create_model("test_resnet", num_classes=3), img_size=32)
    run_dir = dynamize.save(net, tmp_path / "run", extra={"gates_trained": kinds, "budget": 0.5})
    assert run(["report", str(run_dir), "--static", "-o", str(tmp_path / "rep")]) == 0
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["runs"][0]["gates"] == kinds
    assert f"gates {kinds}," in (tmp_path / "rep" / "report.md").read_text()
