"""The generic training loop behind `dynamize train` and `dynamize finetune`: progress, metrics, checkpoints,
resume, DDP. It knows nothing about gates: the caller passes the parameter groups, the task returns its loss and any
per-image scalars to log, and a task with an `on_step(step, total)` method owns its schedule (as timm's loop calls
`update_ema(step=...)`).

Checkpoints are written every epoch (and every `checkpoint_every` steps) to `checkpoints/last/` by writing a temporary
directory and renaming it, so an interrupted run always finds a complete checkpoint. The data order depends only on
(seed, epoch) and the RNG states are saved, so a resumed run continues exactly where it stopped (with workers=0).
"""
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import TrainingTask
from timm.utils import unwrap_model
from torch import nn

from ..errors import DynamizeError, OutputError, RunError
from ..io.atomic import newest_complete, write_dir, write_text
from .data import EpochSampler, loader
from .recipe import Recipe

CHECKPOINT = Path("checkpoints") / "last"


class TrainingError(DynamizeError):
    """Training cannot go on (a NaN loss); the last good checkpoint is kept."""


class Interrupted(DynamizeError):
    """The user pressed Ctrl-C; a resumable checkpoint was written."""


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Distributed:
    """Join the torchrun job described by the environment, if any (gloo on CPU, nccl on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return Distributed(dist.get_rank(), dist.get_world_size())
    return Distributed()


@dataclass
class TrainState:
    """Where training is; saved in every checkpoint. `sums` holds the running totals of the current epoch."""
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict] = field(default_factory=list)
    sums: dict[str, float] = field(default_factory=dict)


def _save_checkpoint(out: Path, model: nn.Module, optimizer, scheduler, state: TrainState, recipe: Recipe) -> None:
    opt = optimizer.state_dict()
    tensors = {f"{pid}.{k}": v for pid, s in opt["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    meta = {
        "progress": state.__dict__, "recipe": recipe.to_dict(), "param_groups": opt["param_groups"],
        "scalar_state": {f"{pid}.{k}": v for pid, s in opt["state"].items() for k, v in s.items()
                         if not torch.is_tensor(v)},
        "scheduler": scheduler.state_dict(), "python_rng": _jsonable(random.getstate()),
    }

    def write(tmp: Path) -> None:
        weights = {k: v.contiguous() for k, v in unwrap_model(model).state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        save_file({**tensors, "__torch_rng__": torch.get_rng_state()}, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta))

    write_dir(out / CHECKPOINT, write)


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def _load_checkpoint(out: Path, model: nn.Module, optimizer, scheduler) -> TrainState:
    ckpt = newest_complete(out / CHECKPOINT)
    try:
        meta = json.loads((ckpt / "state.json").read_text())
        weights = load_file(str(ckpt / "model.safetensors"))
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
        unwrap_model(model).load_state_dict(weights, strict=True)
        state: dict[int, dict] = {}
        for key, value in list(tensors.items()) + list(meta["scalar_state"].items()):
            if key == "__torch_rng__":
                continue
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["__torch_rng__"])
        random.setstate(_tupled(meta["python_rng"]))
        return TrainState(**meta["progress"])
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, SafetensorError) as e:
        raise _checkpoint_error(ckpt, e) from None


def _checkpoint_error(ckpt: Path, e: Exception) -> RunError:
    if isinstance(e, FileNotFoundError):
        return RunError(f"no checkpoint to resume in {ckpt}; start without --resume")
    return RunError(f"the checkpoint in {ckpt} is damaged ({type(e).__name__}); delete {ckpt} and start "
                    "without --resume")


def checkpoint_recipe(out: Path) -> Recipe:
    """The recipe a run was started with, from its last checkpoint: what `--resume` continues with.

    Raises:
        RunError: there is no checkpoint, or it is damaged.
    """
    ckpt = newest_complete(out / CHECKPOINT)
    try:
        return Recipe(**json.loads((ckpt / "state.json").read_text())["recipe"]).validate()
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, SafetensorError) as e:
        raise _checkpoint_error(ckpt, e) from None


def resume_recipe(out: Path, asked: Recipe, keys: Iterable[str]) -> Recipe:
    """The recipe `--resume` continues with: the checkpoint's. Values asked for again must be the same.

    Args:
        out: the run directory being resumed.
        asked: the recipe built from what was asked for on this command line.
        keys: the keys the user gave (options, overrides, a recipe file); the others are not compared.

    Raises:
        RunError: no checkpoint, a damaged one, or a key whose asked value differs from the checkpoint's.
    """
    recipe = checkpoint_recipe(out)
    for key in sorted(keys):
        then, now = getattr(recipe, key), getattr(asked, key)
        if then != now:
            raise RunError(f"{out} was started with {key}={then!r}, not {now!r}; resume with the same values "
                           "(or leave them out), or start a new run with another -o")
    return recipe


class _StopFlag:
    """Turns Ctrl-C (SIGINT) and SIGTERM into a request that the loop honours between steps, so the checkpoint is
    consistent. SIGTERM is what batch schedulers and container runtimes send before they kill a job. A step can be
    long (a settle calibrates thresholds for minutes), so a second signal stops at once: the run then resumes from
    its last periodic checkpoint."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, *_):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if sys.stderr.isatty():  # someone is waiting at a terminal; a log keeps its one line per interruption
            print("dynamize: stopping after this step (a checkpoint follows); Ctrl-C again stops at once, and "
                  "--resume then starts from the last periodic checkpoint", file=sys.stderr)

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


def _any_rank(flag: bool, ddp: Distributed) -> bool:
    """Whether any process of the job has `flag` set. A signal reaches each rank at its own moment; were one rank
    to stop after a step and another to go on, the second would fail with a traceback (or hang) in the next step's
    all-reduce, and the job would end neither interrupted nor resumable from that step."""
    if ddp.world == 1:
        return flag
    agreed = torch.tensor([int(flag)])
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return bool(agreed.item())


def fit(task: TrainingTask, model: nn.Module, train_ds, recipe: Recipe, out: Path, param_groups: list[dict], *,
        resume: bool = False, evaluate: Callable[[nn.Module], dict] | None = None,
        ddp: Distributed | None = None, console: Console | None = None) -> list[dict]:
    """Train `task` (a timm TrainingTask around `model`) and return the per-epoch metrics.

    Args:
        task: returns a dict with "loss", "output" and any per-image tensors to log (averaged as `train_NAME`)
            for a batch; if it has `on_step(step, total)`, that is called before each step (step counts from 0).
        model: the trainable model inside `task`, for checkpoints.
        train_ds: the training data set.
        recipe: optimiser, schedule, epochs, batch size, seed, checkpoint frequency.
        out: run directory; checkpoints go to out/checkpoints/last, metrics to out/metrics.jsonl.
        param_groups: the optimiser's parameter groups, with their learning rates and weight decay.
        resume: continue from out/checkpoints/last.
        evaluate: called on the model after each epoch; its dict is merged into the epoch's metrics.
        ddp: this process's rank; rank 0 writes files.

    Raises:
        TrainingError: the loss became NaN or infinite.
        Interrupted: Ctrl-C; a checkpoint was written first.
    """
    console = console or Console()
    ddp = ddp or Distributed()
    optimizer = create_optimizer_v2(param_groups, opt=recipe.opt, lr=recipe.lr_backbone,
                                    weight_decay=recipe.weight_decay)
    sampler = EpochSampler(len(train_ds), recipe.seed, ddp.rank, ddp.world)
    steps_per_epoch = len(sampler) // recipe.batch_size
    if steps_per_epoch < 1:
        raise TrainingError(f"the training split has {len(train_ds)} images, fewer than one batch of "
                            f"{recipe.batch_size} per process; lower batch_size")
    # timm annotates warmup_epochs as an int; stepping per update, it multiplies it by updates_per_epoch, so a
    # fraction of an epoch works.
    scheduler, _ = create_scheduler_v2(optimizer, sched=recipe.sched, num_epochs=recipe.epochs, step_on_epochs=False,
                                       warmup_epochs=recipe.warmup_epochs,  # type: ignore[arg-type]
                                       updates_per_epoch=steps_per_epoch, warmup_lr=1e-6, min_lr=1e-6)
    total = recipe.epochs * steps_per_epoch
    on_step = getattr(task, "on_step", None)
    if ddp.world > 1:
        task.prepare_distributed()
    state = _load_checkpoint(out, model, optimizer, scheduler) if resume else TrainState()
    if resume and ddp.main:
        console.print(f"resuming {out} from its checkpoint at step {state.global_step} of {total}", highlight=False)
    if not resume:
        torch.manual_seed(recipe.seed)
        random.seed(recipe.seed)
    metrics_file = out / "metrics.jsonl"
    if ddp.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot write {out} ({e.strerror}); choose another -o") from None
        _rewrite_metrics(metrics_file, state.history)

    live = console.is_terminal and ddp.main  # a log file or CI gets one plain line per epoch instead of a bar
    columns = [TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with _StopFlag() as stop, Progress(*columns, console=console, disable=not live) as bar:
        while state.epoch < recipe.epochs:
            sampler.set_position(state.epoch, state.step_in_epoch * recipe.batch_size)
            bar_id = bar.add_task("", total=steps_per_epoch, completed=state.step_in_epoch,
                                  epoch=f"{state.epoch + 1}/{recipe.epochs}", stats="")
            task.train()
            sums = state.sums = state.sums or {"n": 0.0, "loss": 0.0, "top1": 0.0, "seconds": 0.0}
            start = time.time()
            batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = []
            if state.step_in_epoch < steps_per_epoch:
                batches = loader(train_ds, recipe.batch_size, sampler, recipe.workers)
            for images, labels in batches:
                if on_step is not None:
                    on_step(state.global_step, total)
                result = task(images, labels)
                loss = result["loss"]
                if not torch.isfinite(loss):
                    raise TrainingError(f"the loss is {loss.item()} at step {state.global_step} (epoch "
                                        f"{state.epoch + 1}); the last good checkpoint is kept in "
                                        f"{out / CHECKPOINT}; lower the learning rates and resume")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                state.global_step += 1
                state.step_in_epoch += 1
                scheduler.step_update(state.global_step)
                _accumulate(sums, result, labels)
                sums["seconds"] += time.time() - start
                start = time.time()
                bar.update(bar_id, advance=1, stats=_stats_text(sums))
                if ddp.main and recipe.checkpoint_every and state.global_step % recipe.checkpoint_every == 0:
                    _save_checkpoint(out, model, optimizer, scheduler, state, recipe)
                if _any_rank(stop.requested, ddp):
                    if ddp.main:
                        _save_checkpoint(out, model, optimizer, scheduler, state, recipe)
                    raise Interrupted(f"interrupted at step {state.global_step}; resume with --resume")
                if state.step_in_epoch >= steps_per_epoch:
                    break
            row = {"epoch": state.epoch + 1, "step": state.global_step, "lr": optimizer.param_groups[0]["lr"],
                   **{f"train_{k}": v / sums["n"] for k, v in sums.items() if k not in ("n", "seconds")},
                   "seconds": sums["seconds"]}
            if evaluate and ddp.main:
                row.update(evaluate(model))
            state.history.append(row)
            state.epoch += 1
            state.step_in_epoch = 0
            state.sums = {}
            bar.update(bar_id, stats=_stats_text(sums) + "".join(
                f" {k}={v:.3f}" for k, v in row.items() if k.startswith("calib") and k != "calib_n"))
            if ddp.main and not live:
                console.print(" ".join(f"{k}={_fmt(v)}" for k, v in row.items()), soft_wrap=True, highlight=False)
            if ddp.main:
                _save_checkpoint(out, model, optimizer, scheduler, state, recipe)
                _rewrite_metrics(metrics_file, state.history)
    if ddp.world > 1:
        # DDP syncs gradients, not the norms' running statistics: make every rank hold rank 0's model.
        for buf in unwrap_model(model).buffers():
            dist.broadcast(buf, src=0)
        dist.barrier()
    return state.history


def _accumulate(sums: dict[str, float], result: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
    """Add a batch to the epoch's totals: loss, top-1 and every per-image scalar the task returned."""
    n = labels.shape[0]
    sums["n"] += n
    sums["loss"] += result["loss"].item() * n
    sums["top1"] += 100 * (result["output"].argmax(1) == labels).sum().item()
    for key, value in result.items():
        if key not in ("loss", "output") and torch.is_tensor(value):
            value = value.detach()
            sums[key] = sums.get(key, 0.0) + (value.sum().item() if value.dim() else value.item() * n)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _stats_text(s: dict[str, float]) -> str:
    if not s["n"]:
        return ""
    return " ".join(f"{k}={s[k] / s['n']:.3f}" for k in s if k not in ("n", "seconds"))


def _rewrite_metrics(path: Path, history: list[dict]) -> None:
    """metrics.jsonl, one line per finished epoch, replaced atomically (a resumed run rewrites the same lines)."""
    write_text(path, "".join(json.dumps(row) + "\n" for row in history))
