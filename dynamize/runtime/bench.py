"""Wall-clock benchmark of a gated model's runtime against the dense original, on the same weights and inputs.

The dynamic model runs the same fast path as a model from `dynamize.load` (`use_runtime`), on either its learned
decisions or forced random ones at a chosen FLOPs fraction. Every timed pass draws new images (random ones, or a
batch from images the caller passes in, such as a test split) and, when forced, new random decisions, so that
shapes and kept channels change between passes as they do in use. Dense and dynamic passes alternate in one process
so that both see the same machine load; each configuration reports medians with the 10th and 90th percentiles.
"""
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import DynamizeError, OutputError, RunError
from ..graph.convert import convert
from ..graph.cost import expected_fraction, min_fraction
from ..graph.gates import WidthGate
from ..graph.plan import GatePlan
from ..graph.rewrite import DynamicNet
from ..io.atomic import write_json
from ..io.runs import load, read_config
from ..models import check_model_name, create_base
from .cascade import CASCADE, Cascade, last_fractions, load_cascade
from .sliced import use_runtime


@dataclass
class BenchResult:
    """One timed configuration.

    Attributes:
        fraction: the dynamic model's mean FLOPs fraction over the timed passes.
        dense_ms, dynamic_ms: median milliseconds per pass; `*_p10`, `*_p90` their 10th and 90th percentiles.
        speedup: median over passes of dense / dynamic time, each pair timed back to back (robust to load that
            drifts during the run); `speedup_p10`, `speedup_p90` its spread.
        repeats: timed passes of each model.
        threads: torch threads used.
        decisions: "learned" or "random".
        images: "random", or the name of the data the images came from.
        passes: (FLOPs fraction, dynamic ms) of each timed pass: at batch size 1, what each image cost.
    """
    model: str
    batch_size: int
    fraction: float
    dense_ms: float
    dynamic_ms: float
    dense_p10: float
    dense_p90: float
    dynamic_p10: float
    dynamic_p90: float
    speedup: float
    speedup_p10: float
    speedup_p90: float
    repeats: int
    threads: int
    decisions: str
    images: str
    passes: list[tuple[float, float]] = field(default_factory=list)

    @property
    def ideal(self) -> float:
        """The speedup that FLOPs promise: 1 / FLOPs fraction."""
        return 1.0 / self.fraction

    def by_cost(self, share: float = 1 / 3) -> tuple[tuple[float, float], tuple[float, float]]:
        """(mean FLOPs fraction, median ms) of the cheapest and of the dearest `share` of the passes: at batch size
        1, whether the images the gates let off cheaply also run faster."""
        ordered = sorted(self.passes)
        n = max(1, round(len(ordered) * share))

        def summary(part: list[tuple[float, float]]) -> tuple[float, float]:
            return statistics.fmean(f for f, _ in part), statistics.median(ms for _, ms in part)

        return summary(ordered[:n]), summary(ordered[-n:])

    def to_dict(self) -> dict:
        return {**asdict(self), "ideal": self.ideal}


def check_fraction(fraction: float) -> None:
    """Raise a DynamizeError unless 0 < fraction <= 1."""
    if not 0.0 < fraction <= 1.0:
        raise DynamizeError(f"--fraction must be in (0, 1], not {fraction}")


def keep_probability(plan: GatePlan, fraction: float) -> float:
    """The keep probability p whose expected FLOPs fraction is `fraction` (bisection: the fraction grows with p).

    Raises:
        DynamizeError: the fraction is below what the model reaches with every gate closed.
    """
    check_fraction(fraction)
    floor = min_fraction(plan)
    if fraction < floor:
        ungated = plan.largest_ungated()
        raise DynamizeError(f"--fraction {fraction} is below {floor:.3f}, the FLOPs fraction of {plan.architecture} "
                            f"with every gate closed{f' (no gate controls {ungated})' if ungated else ''}; choose a "
                            "larger one")
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_fraction(plan, mid) < fraction else (lo, mid)
    return (lo + hi) / 2


def force_random(net: DynamicNet, p: float, batch: int, generator: torch.Generator) -> None:
    """Force every gate of `net` to random per-image decisions that keep a share p of its units.

    Each image keeps exactly round(p * n) of its n blocks and of each group's channels (a random subset), so that
    even a single image lands close to the expected FLOPs fraction; a width-mode group keeps a prefix, at one of the
    two widths around p of its channels.
    """
    blocks = [gate for kind, _, gate in net.gates() if kind == "layer"]
    if blocks:
        keep = _exactly(p, batch, len(blocks), generator)
        for j, gate in enumerate(blocks):
            gate.forced = keep[:, j:j + 1]
    for kind, _, gate in net.gates():
        if isinstance(gate, WidthGate):
            gate.forced = gate.prefixes(_widths(p, batch, gate.widths, generator))
        elif kind == "channel":
            gate.forced = _exactly(p, batch, gate.units, generator, gate.min_keep)


def _widths(p: float, batch: int, widths: list[int], generator: torch.Generator) -> torch.Tensor:
    """[batch] random widths among `widths` whose mean is p of the channels (or the narrowest width, if more): each
    image takes one of the two widths around that mean, the wider one with the probability that gives the mean."""
    target = max(p * widths[-1], widths[0])
    hi = next(i for i, w in enumerate(widths) if w >= target)
    lo = max(hi - 1, 0)
    share = (target - widths[lo]) / max(widths[hi] - widths[lo], 1)
    wider = torch.rand(batch, generator=generator) < share
    return torch.where(wider, widths[hi], widths[lo])


def _exactly(p: float, batch: int, units: int, generator: torch.Generator, at_least: int = 0) -> torch.Tensor:
    """[batch, units] 0/1 rows, each with round(p * units) ones (at least `at_least`) at random places."""
    ranks = torch.rand(batch, units, generator=generator).argsort(1).argsort(1)
    return (ranks < max(round(p * units), at_least)).float()


def release(net: DynamicNet) -> None:
    """Return every gate of `net` to its learned decisions."""
    for _, _, gate in net.gates():
        gate.forced = None


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of `values`, linearly interpolated."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@torch.inference_mode()
def time_pairs(dense: Callable, dynamic: Callable, inputs: Callable[[int], torch.Tensor], repeats: int,
               warmup: int, after: Callable[[], None] = lambda: None) -> tuple[list[float], list[float]]:
    """Milliseconds of `dense(x)` and `dynamic(x)` on `repeats` inputs, the two run back to back on each.

    Args:
        dense, dynamic: the two models.
        inputs: returns the input of pass i (and may set up its decisions); called outside the timed region.
        repeats: timed passes.
        warmup: untimed passes first (allocator, thread pool, oneDNN and weight caches).
        after: called after each timed dynamic pass, outside the timed region (to read its decisions).
    """
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(warmup + repeats):
        x = inputs(i)
        order = ((dense, 0), (dynamic, 1)) if i % 2 else ((dynamic, 1), (dense, 0))  # neither always goes first
        for fn, which in order:
            start = time.perf_counter()
            fn(x)
            elapsed = 1e3 * (time.perf_counter() - start)
            if i >= warmup:
                times[which].append(elapsed)
                if which:
                    after()
    return times


def bench(net: DynamicNet | Cascade, dense: nn.Module, name: str, batch_sizes: Sequence[int], img_size: int,
          fraction: float | None = None, repeats: int = 10, warmup: int = 2, channels_last: bool = True,
          seed: int = 0, images: torch.Tensor | None = None, images_name: str = "random") -> list[BenchResult]:
    """Time the dense model against the gated model's runtime at each batch size.

    Args:
        net: the gated model (a DynamicNet) or a cascade; its gates are released again afterwards.
        dense: the original model with the same weights (of a cascade: its original model).
        name: the model's name in the results.
        batch_sizes: batch sizes to time.
        img_size: square input size of random images.
        fraction: force random decisions with this mean FLOPs fraction, new ones for every pass; None: the
            learned decisions.
        repeats: timed passes of each model per configuration.
        warmup: untimed passes first.
        channels_last: run both models on channels-last tensors (faster convolutions on most CPUs).
        seed: seeds the images and the forced decisions.
        images: [M, C, H, W] images to draw each pass's batch from (e.g. a test split); None: random images.
        images_name: what `images` are, for the results.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net, dense = net.eval().to(memory_format=fmt), dense.eval().to(memory_format=fmt)
    gated = net.gated if isinstance(net, Cascade) else net
    runtime = net if isinstance(net, Cascade) else use_runtime(net)
    p = keep_probability(net.plan, fraction) if fraction is not None else None
    generator = torch.Generator().manual_seed(seed)
    shape = (net.plan.input_size[0], img_size, img_size)
    results = []
    try:
        for batch in batch_sizes:
            def inputs(i: int, batch: int = batch) -> torch.Tensor:
                if images is None:
                    x = torch.randn(batch, *shape, generator=generator)
                else:
                    x = images[torch.randint(len(images), (batch,), generator=generator)]
                if p is not None:
                    force_random(gated, p, batch, generator)
                return x.contiguous(memory_format=fmt)

            fractions: list[float] = []
            dense_t, dynamic_t = time_pairs(dense, runtime, inputs, repeats, warmup,
                                            after=lambda: fractions.append(last_fractions(net).mean().item()))
            ratios = [d / s for d, s in zip(dense_t, dynamic_t)]
            results.append(BenchResult(
                name, batch, statistics.fmean(fractions), statistics.median(dense_t), statistics.median(dynamic_t),
                percentile(dense_t, 10), percentile(dense_t, 90), percentile(dynamic_t, 10),
                percentile(dynamic_t, 90), statistics.median(ratios), percentile(ratios, 10), percentile(ratios, 90),
                repeats, torch.get_num_threads(), "random" if p is not None else "learned", images_name,
                list(zip(fractions, dynamic_t))))
    finally:
        release(gated)
    return results


def open_target(target: str, fraction: float | None, img_size: int | None, profitable_only: bool = False,
                channel_mode: str = "channel") -> tuple[DynamicNet | Cascade, nn.Module, int]:
    """The gated model, its dense twin (same weights, no gates) and the input size to time them at; of a cascade
    run, the cascade and its original model.

    Args:
        target: a run directory (learned decisions) or a timm model name (random weights; needs `fraction`).
        fraction: the FLOPs fraction random decisions will be forced to, if any.
        img_size: square input size of a model name; default: the size the plan counts FLOPs at. A run is timed at
            its plan's size, the size its FLOPs fractions are counted at.
        profitable_only: convert a model name without the channel gates that cannot pay for themselves (see
            `dynamize.graph.convert.plan_model`); a run keeps the gates it was trained with.
        channel_mode: how a model name's C-Nets keep channels, "channel" or "width" (a run keeps its own).

    Raises:
        DynamizeError: not a run directory, unknown model name, a model name without `fraction`, a bad fraction, or
            a run with an `img_size` other than its own.
    """
    if fraction is not None:
        check_fraction(fraction)
    path = Path(target)
    if path.is_dir() and CASCADE in read_config(path)["dynamize"]:
        cascade = load_cascade(path)
        return cascade, cascade.original, _run_size(target, cascade.plan, img_size)
    if path.is_dir():
        net = load(path)
        img_size = _run_size(target, net.plan, img_size)
    elif path.exists():
        raise RunError(f"{target} is a file, not a run directory (a folder with config.json and model.safetensors)")
    else:
        check_model_name(target)
        if fraction is None:
            raise DynamizeError(f"{target} is a model name, which has no learned decisions; pass --fraction F to "
                                "time random decisions with that FLOPs fraction, or pass a run directory")
        net = convert(target, img_size=img_size, profitable_only=profitable_only, channel_mode=channel_mode)
    plan = net.plan
    dense = create_base(plan.architecture, num_classes=net.num_classes, in_chans=plan.input_size[0])
    dense.load_state_dict(net.base_state_dict(), strict=True)
    return net.eval(), dense, img_size or plan.input_size[-1]


def _run_size(target: str, plan: GatePlan, img_size: int | None) -> int:
    """The input size a run is timed at: its plan's. At another size the timings would no longer match the FLOPs
    fractions and ideal speedups the plan counts (nor the images its gates learned on), so it is refused rather than
    honoured.

    Raises:
        RunError: `img_size` is given and is not the plan's.
    """
    size = plan.input_size[-1]
    if img_size is not None and img_size != size:
        raise RunError(f"{target} is a run at {size} px (its FLOPs fractions are counted at that size), not "
                            f"--img-size {img_size}; leave out --img-size to time it at {size} px")
    return size


def write_results(path: Path, results: Sequence[BenchResult]) -> None:
    """Write `{"results": [...]}` to `path` through a temporary file and a rename.

    Raises:
        OutputError: the file cannot be written.
    """
    try:
        write_json(Path(path), {"results": [r.to_dict() for r in results]})
    except OSError as e:
        raise OutputError(f"cannot write {path} ({e.strerror}); choose another --json") from None
