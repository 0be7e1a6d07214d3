"""Entry point: the Typer app, and the one place where user errors become one line on stderr and exit code 2."""
import os
import sys

import typer
from typer.exceptions import TyperException

from dynamize.errors import DynamizeError
from dynamize.training.loop import Interrupted
from dynamize.version import __version__

from . import bench as bench_cmds
from . import convert as convert_cmds
from . import demo as demo_cmds
from . import report as report_cmds
from . import train as train_cmds

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make timm CNNs input-adaptive with LC-Net layer and channel gates.")


def _print_version(value: bool) -> None:
    if value:
        print(f"dynamize {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="print the version and exit")) -> None:
    """Make timm CNNs input-adaptive with LC-Net layer and channel gates."""


convert_cmds.register(app)
bench_cmds.register(app)
train_cmds.register(app)
demo_cmds.register(app)
report_cmds.register(app)


def _say(message: str) -> None:
    """One line on stderr, from one process: under torchrun every rank meets the same error or interrupt."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; bad input gives one line on stderr and 2."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv if argv is not None else sys.argv[1:], prog_name="dynamize", standalone_mode=False)
    except Interrupted as e:
        _say(f"dynamize: {e}")
        return 130
    except (DynamizeError, TyperException) as e:
        msg = e.format_message() if isinstance(e, TyperException) else str(e)
        _say(f"dynamize: error: {' '.join(msg.split())}")
        return 2
    except typer.Exit as e:
        return e.exit_code
    except (KeyboardInterrupt, typer.Abort):
        _say("dynamize: interrupted")
        return 130
    return 0


def main() -> None:
    sys.exit(run())
