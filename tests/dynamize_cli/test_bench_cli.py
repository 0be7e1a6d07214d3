"""`dynamize bench` through the real CLI entry point: tables, JSON, and one-line errors (not timings)."""
import json

import pytest

from dynamize_cli.main import run

FAST = ["--img-size", "32", "--repeats", "3", "--warmup", "0", "--threads", "1"]


def test_bench_model_with_fraction_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert run(["bench", "test_resnet", "--fraction", "0.6", "--batch-size", "1", "--batch-size", "2", *FAST,
                "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "ideal" in printed and "FLOPs fraction 0.6" in printed
    results = json.loads(out.read_text())["results"]
    assert [r["batch_size"] for r in results] == [1, 2]
    for r in results:
        assert set(r) == {"model", "batch_size", "fraction", "dense_ms", "dynamic_ms", "dense_p10", "dense_p90",
                          "dynamic_p10", "dynamic_p90", "speedup", "speedup_p10", "speedup_p90", "ideal", "repeats",
                          "threads", "decisions", "images", "passes"}
        assert r["model"] == "test_resnet" and 0 < r["fraction"] <= 1 and r["dense_ms"] > 0 and r["dynamic_ms"] > 0
        assert r["ideal"] == pytest.approx(1 / r["fraction"])
        assert r["dense_p10"] <= r["dense_ms"] <= r["dense_p90"] and r["speedup_p10"] <= r["speedup_p90"]
        assert (r["threads"], r["repeats"], r["decisions"], r["images"]) == (1, 3, "random", "random")
        assert len(r["passes"]) == 3 and all(0 < f <= 1 and ms > 0 for f, ms in r["passes"])
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temporary file left behind


@pytest.mark.parametrize("repeats, counts", [("1", "1 thread, 1 pass"), ("2", "1 thread, 2 passes")])
def test_bench_title_counts_threads_and_passes(repeats, counts, capsys):
    assert run(["bench", "test_resnet", "--fraction", "0.6", "--batch-size", "1", *FAST, "--repeats", repeats]) == 0
    title = " ".join(capsys.readouterr().out.split())  # the title wraps on a narrow terminal
    assert f"32px, {counts} " in title


def test_bench_run_directory_uses_learned_decisions(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(["convert", "test_resnet", "--no-pretrained", "--num-classes", "3", "--img-size", "32",
                "-o", str(run_dir)]) == 0
    capsys.readouterr()
    assert run(["bench", str(run_dir), "--batch-size", "1", *FAST]) == 0
    assert "learned decisions" in capsys.readouterr().out


def test_bench_times_learned_decisions_on_test_images(tmp_path, image_folder, capsys):
    run_dir, out = tmp_path / "run", tmp_path / "bench.json"
    assert run(["convert", "test_resnet", "--no-pretrained", "--num-classes", "3", "--img-size", "32",
                "-o", str(run_dir)]) == 0
    capsys.readouterr()
    assert run(["bench", str(run_dir), "--data", str(image_folder), "--batch-size", "2", *FAST,
                "--json", str(out)]) == 0
    assert "test images of" in capsys.readouterr().out
    (result,) = json.loads(out.read_text())["results"]
    assert (result["decisions"], result["images"]) == ("learned", str(image_folder))


@pytest.mark.parametrize("args, message", [
    (["test_resnet", "--fraction", "0"], "--fraction must be in (0, 1]"),
    (["test_resnet", "--fraction", "1.5"], "--fraction must be in (0, 1]"),
    (["resnet5O", "--fraction", "0.5"], "did you mean resnet50"),
    (["test_resnet"], "pass --fraction"),
    (["test_resnet", "--fraction", "0.01"], "every gate closed"),
])
def test_bench_bad_input_is_one_line(args, message, capsys):
    assert run(["bench", *args, "--batch-size", "1", *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dynamize: error:") and message in err


def test_bench_file_is_not_a_run_directory(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert run(["bench", str(tmp_path / "file"), "--batch-size", "1", *FAST]) == 2
    assert "not a run directory" in capsys.readouterr().err
