"""Fine-tuning on several processes: time per image of `dynamize finetune` as one process and under torchrun.

Three configurations of the same fine-tune, each a real `dynamize finetune` of one converted run over the same
training subset and global batch, one epoch with the gates learning (`settle_fraction=0`: no settle inside it):

- one process with every core's thread (`OMP_NUM_THREADS=CORES`, batch B);
- torchrun, one process per core with one thread each (DDP over gloo, batch B / CORES per process), as shipped:
  the student wrapped with `find_unused_parameters=True`, which the settle needs (`BudgetDistillationTask`);
- the same without `find_unused_parameters`, to price that choice (this script patches it in as its own worker;
  such a job would fail at a settle, which these epochs do not reach).

The figure is the epoch's training seconds (metrics.jsonl) per image: start-up, the final calibration and the
evaluation are left out. The configurations take turns, repeated; the medians are printed.

    python benchmarks/ddp.py CONVERTED_RUN [--images 8192] [--batch 128] [--repeats 3] [--json OUT]
"""
import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from budget_sweep import facts

CORES = len(os.sched_getaffinity(0))  # the cores this process may run on: one torchrun process per core
CONFIGS = ("one process", "torchrun", "torchrun, no find_unused")


def _finetune_args(run: Path, out: Path, images: int, batch: int) -> list[str]:
    sets = {"epochs": 1, "settle_fraction": 0, "train_subset": images, "batch_size": batch, "calib_size": 256,
            "eval_subset": 256, "bn_images": 256, "checkpoint_every": 0}
    return ["finetune", str(run), "--budget", "0.25", "-o", str(out),
            *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]


def _command(config: str, args: list[str]) -> tuple[list[str], int]:
    """The command line of one configuration and its threads per process."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(CORES)]
    if config == "one process":
        return [sys.executable, "-m", "dynamize_cli", *args], CORES
    if config == "torchrun":
        return [*torchrun, "-m", "dynamize_cli", *args], 1
    return [*torchrun, __file__, "--worker", *args], 1


def seconds_per_image(config: str, run: Path, images: int, batch: int) -> float:
    """Train one epoch in `config`; the epoch's training seconds over its images."""
    with tempfile.TemporaryDirectory() as tmp:
        per_process = batch if config == "one process" else batch // CORES
        command, threads = _command(config, _finetune_args(run, Path(tmp) / "run", images, per_process))
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                       stdout=subprocess.DEVNULL)
        row = json.loads((Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()[0])
        return row["seconds"] / (row["step"] * batch)


def worker(argv: list[str]) -> None:
    """One torchrun process of `dynamize finetune` whose student's DDP does not look for unused parameters."""
    from dynamize.training.distill import BudgetDistillationTask
    from dynamize_cli.main import main as cli

    BudgetDistillationTask.prepare_distributed = functools.partialmethod(  # type: ignore[method-assign,assignment]
        BudgetDistillationTask.prepare_distributed, find_unused_parameters=False)
    sys.argv = ["dynamize", *argv]
    cli()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a `dynamize convert` run")
    parser.add_argument("--images", type=int, default=8192, help="training images in the epoch")
    parser.add_argument("--batch", type=int, default=128, help="global batch (split over the processes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="append the result as one JSON line here")
    args = parser.parse_args()
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for r in range(args.repeats):
        for config in CONFIGS if r % 2 == 0 else reversed(CONFIGS):
            times[config].append(seconds_per_image(config, args.run, args.images, args.batch))
            print(f"{config}: {1e3 * times[config][-1]:.2f} ms per image", flush=True)
    medians = {c: statistics.median(t) for c, t in times.items()}
    base = medians["one process"]
    for config, m in medians.items():
        print(f"{config:>26}: {1e3 * m:.2f} ms per image (median of {args.repeats}), {base / m:.2f}x one process")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"run": str(args.run), "images": args.images, "batch": args.batch,
                                "ms_per_image": {c: [1e3 * x for x in t] for c, t in times.items()},
                                **facts()}) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        main()
