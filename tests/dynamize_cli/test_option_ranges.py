"""Property test: every numeric option of every command, and every numeric recipe key given with `--set`, is
refused at the edges of its range (0, -1, huge, NaN, empty, wrong type, just outside) with exit code 2, one line on
stderr, no traceback, and nothing written. The values come from the one table of ranges, `dynamize.ranges`."""
from dataclasses import fields
from typing import get_args

import pytest
import typer
from helpers import TINY_RECIPE

from dynamize.ranges import RANGES, Range
from dynamize.training.recipe import Recipe
from dynamize_cli.main import app, run

COMMANDS = typer.main.get_command(app).commands
_EDGES = ["0", "-1", str(10**30), "1e30", "nan", "inf", "-inf", "", "abc", "1.5", "[1]"]


def _numeric(param) -> bool:
    annotation = param.type_descriptor.annotation
    return bool({int, float} & set(get_args(annotation) or [annotation]))


NUMERIC_OPTIONS = [(name, p.name) for name, command in sorted(COMMANDS.items()) for p in command.params
                   if _numeric(p)]
RECIPE_KEYS = sorted(f.name for f in fields(Recipe) if f.name in RANGES)
NULLABLE = {f.name for f in fields(Recipe) if type(None) in get_args(f.type)}


def _inside(r: Range, raw: str) -> bool:
    try:
        return r.kind(raw) in r
    except ValueError:
        return False


def bad_values(key: str, recipe: bool = False) -> list[str]:
    """Values at and beyond the edges of `key`'s range that must be refused."""
    r = RANGES[key]
    just_outside = [r.low if r.low_open else r.low - 1, r.high if r.high_open else r.high + 1]
    values = _EDGES + [str(r.kind(v)) if r.kind is int else repr(float(v)) for v in just_outside]
    return [v for v in dict.fromkeys(values) if not _inside(r, v) and not (recipe and v == "" and key in NULLABLE)]


@pytest.fixture(scope="module")
def base(tiny_runs, tmp_path_factory):
    """A valid command line per command, all writing to one output path that must never appear."""
    root, data = tiny_runs
    out = tmp_path_factory.mktemp("out") / "never"
    sets = [x for kv in TINY_RECIPE for x in ("--set", kv)]
    argv = {
        "convert": ["convert", "test_resnet", "--no-pretrained", "--num-classes", "3", "--img-size", "32"],
        "bench": ["bench", "test_resnet", "--fraction", "0.5", "--batch-size", "1", "--img-size", "32",
                  "--repeats", "1", "--warmup", "0", "--threads", "1", "--json", str(out / "bench.json")],
        "report": ["report", str(root / "ft"), "--data", str(data), "--limit", "4", "--batch-size", "4"],
        "finetune": ["finetune", str(root / "conv"), "--budget", "0.6", "--data", str(data), *sets],
        "calibrate": ["calibrate", str(root / "ft"), "--budget", "0.6"],
        "cascade": ["cascade", str(root / "ft"), "--budget", "1.0"],
        "demo": ["demo", "--budget", "0.5"],
        "train": ["train", "test_resnet", "--data", str(data), *sets],
    }
    return {k: v + (["-o", str(out)] if k != "bench" else []) for k, v in argv.items()}, out, root


def _snapshot(root):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _refused(argv, out, root, capsys):
    before = _snapshot(root)
    code = run(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists() and _snapshot(root) == before


def test_every_numeric_option_has_a_range():
    assert len(NUMERIC_OPTIONS) >= 12
    missing = [(command, name) for command, name in NUMERIC_OPTIONS if name not in RANGES]
    assert not missing


@pytest.mark.parametrize("command, name", NUMERIC_OPTIONS, ids=lambda x: x)
def test_numeric_option_edges_are_refused(command, name, base, capsys):
    argv, out, root = base
    option = next(p for p in COMMANDS[command].params if p.name == name).opts[0]
    for value in bad_values(name):
        _refused([*argv[command], option, value], out, root, capsys)


@pytest.mark.parametrize("command", ["train", "finetune"])
@pytest.mark.parametrize("key", RECIPE_KEYS)
def test_recipe_value_edges_are_refused(command, key, base, capsys):
    if command == "finetune" and key == "budget":
        pytest.skip("finetune takes the budget from --budget")
    argv, out, root = base
    for value in bad_values(key, recipe=True):
        _refused([*argv[command], "--set", f"{key}={value}"], out, root, capsys)
