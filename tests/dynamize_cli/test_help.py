"""`--help` of every command reads alike: the same placeholders for the same things, the same short options for
the same options, and a one-line summary in the command list."""
import inspect
import re
from collections import defaultdict

import pytest
import typer

from dynamize_cli.main import app, run

COMMANDS = typer.main.get_command(app).commands


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_usage_names_arguments_in_capitals(name, capsys):
    """MODEL, RUN, KEY=VALUE: the words the option help uses (runs/MODEL, RUN-bB), in every command's usage line."""
    assert run([name, "--help"]) == 0
    usage = next(line for line in capsys.readouterr().out.splitlines() if "Usage:" in line)
    placeholders = [re.sub(r"[][{}.]", "", word) for word in usage.split("[OPTIONS]", 1)[1].split()]
    assert all(p and p == p.upper() for p in placeholders), usage


def test_an_option_has_the_same_short_form_in_every_command():
    """A short option learned on one command works, or is refused, alike on the others: bench alone had -b for
    --batch-size, which report also takes."""
    short = defaultdict(set)
    for command in COMMANDS.values():
        for p in command.params:
            if p.param_type_name == "option":
                long = next(o for o in p.opts if o.startswith("--"))
                short[long].add(tuple(sorted(o for o in p.opts if not o.startswith("--"))))
    assert {long: forms for long, forms in short.items() if len(forms) > 1} == {}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_summary_is_one_line(name):
    """Typer's command list (`dynamize --help`) keeps the line breaks of a command's first paragraph, which then
    breaks mid-sentence; the details go in a paragraph of their own."""
    assert "\n" not in inspect.cleandoc(COMMANDS[name].help).split("\n\n")[0]


def test_a_flag_that_is_off_unless_given_has_no_off_form():
    """--resume and --latency read like --static and --profitable-only: no --no-resume that only restates the
    default."""
    assert [(name, p.opts) for name, command in COMMANDS.items() for p in command.params
            if p.param_type_name == "option" and p.is_flag and p.default is False and p.secondary_opts] == []
