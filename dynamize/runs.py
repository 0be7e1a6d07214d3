"""Where runs live: default output directories and finding the most recent run."""
from pathlib import Path

from .errors import RunError
from .export import CONFIG

RUNS = Path("runs")


def new_run_dir(name: str, root: Path = RUNS) -> Path:
    """`runs/NAME`, or `runs/NAME-2`, `-3`, ... if taken: a default output never replaces an earlier run."""
    path, i = root / name, 1
    while path.exists():
        i += 1
        path = root / f"{name}-{i}"
    return path


def latest_run(root: Path = RUNS) -> Path:
    """The most recently written run directory under `root`.

    Raises:
        RunError: there is none.
    """
    runs = [p for p in root.glob("*") if (p / CONFIG).is_file()] if root.is_dir() else []
    if not runs:
        raise RunError(f"no run directory under {root}/; run `dynamize convert MODEL` first or pass RUN")
    return max(runs, key=lambda p: (p / CONFIG).stat().st_mtime)
