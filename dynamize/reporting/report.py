"""`dynamize report`: a run's accuracy next to its teacher's, the measured FLOPs distribution, and where the gates
spend compute (per block, channel group and class), as report.json (schema in docs/report.md), report.md and plots.

Every number comes from one pass over the evaluation split with the model's hard (evaluation) decisions, so the
report describes the deployed model, not the training-time one. Files are written only after every run was
evaluated, each through a temporary name and a rename: bad input leaves nothing behind.
"""
import datetime
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ..errors import OutputError
from ..graph.cost import GATES, OUTSIDE, flops_by_part, flops_per_image
from ..graph.plan import GatePlan
from ..graph.rewrite import DynamicNet
from ..io.atomic import check_output_dir, write_json, write_text
from ..io.runs import GATED, check_run, latest_run, load, load_teacher
from ..runtime.bench import bench, open_target
from ..runtime.cascade import CASCADE, confidence, escalates
from ..training.data import DataError, DataSpec, eval_dataset, first_images, loader, num_classes
from ..training.evaluate import adaptivity, decision_codes
from ..version import __version__
from .markdown import render_markdown
from .plots import write_plots

REPORT_VERSION = 1
NOT_MEASURED = "not measured"
FLOPS_DEFINITION = ("FLOPs = 2 x multiply-accumulates of convolutions and matrix multiplies, counted by "
                    "torch.utils.flop_counter.FlopCounterMode at the plan's input size")
REPORTS = Path("reports")


@dataclass
class RunEvaluation:
    """One evaluated run: its report.json entry plus the per-image results (in data order) the plots need."""
    entry: dict
    fractions: torch.Tensor
    labels: torch.Tensor
    predictions: torch.Tensor
    dataset: Dataset
    class_names: list[str]


def resolve_runs(runs: Sequence[Path]) -> list[Path]:
    """The runs to report on: those given, or the most recent run.

    Raises:
        RunError: none given and none under runs/.
    """
    return list(runs) if runs else [latest_run()]


def run_names(runs: Sequence[Path]) -> list[str]:
    """Short unique names for runs: the directory name, with -2, -3, ... for repeats."""
    names: list[str] = []
    for run in runs:
        name, i = Path(run).resolve().name, 1
        while name in names:
            i += 1
            name = f"{Path(run).resolve().name}-{i}"
        names.append(name)
    return names


def default_output(names: Sequence[str], static: bool = False) -> Path:
    """`reports/NAME` for one run, `reports/NAME1_vs_NAME2...` for several; `-static` for plan-only reports."""
    stem = "_vs_".join(names)
    if len(stem) > 100:
        stem = f"{names[0]}_vs_{len(names) - 1}_more"
    return REPORTS / (stem + ("-static" if static else ""))


def data_spec(run: Path, config: dict, data: str | None = None, data_dir: str | None = None) -> DataSpec:
    """The evaluation data of a run: `data` if given, else the data set it was fine-tuned on, or the one a converted
    `dynamize train` run was trained on.

    Raises:
        DataError: no data given and the run records none (converted from a timm model, not fine-tuned).
    """
    recipe = config["dynamize"].get("recipe") or config["dynamize"].get("data") or {}
    in_chans, img_size = config["dynamize"]["plan"]["input_size"][:2]
    name = data or recipe.get("data")
    if not name:
        raise DataError(f"{run} records no data set (it was not fine-tuned); pass --data NAME|PATH")
    return DataSpec(name, data_dir or (recipe.get("data_dir") if not data else None),
                    int(recipe.get("img_size", img_size)), int(in_chans))


def class_names(ds: Dataset, n: int) -> list[str]:
    """Class names of a data set made by dynamize.data, or "0", "1", ... when it has none."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    inner = getattr(ds, "ds", ds)
    classes = getattr(inner, "classes", None)
    reader = getattr(inner, "reader", None)
    if classes is None and reader is not None and hasattr(reader, "class_to_idx"):
        classes = sorted(reader.class_to_idx, key=reader.class_to_idx.get)
    return [str(c) for c in classes] if classes is not None and len(classes) == n else [str(i) for i in range(n)]


@torch.no_grad()
def _collect(model: DynamicNet, teacher: nn.Module, data) -> dict[str, torch.Tensor]:
    """One pass over `data`: labels, top-5 and confidence of the gated model, top-5 of the teacher, FLOPs fractions
    and parts, every gate's decisions."""
    model.eval()
    teacher.eval()
    out: dict[str, list[torch.Tensor]] = defaultdict(list)
    for images, target in data:
        logits = model(images)
        k = min(5, logits.shape[1])
        out["labels"].append(target)
        out["top5"].append(logits.topk(k, dim=1).indices)
        out["confidence"].append(confidence(logits))
        out["teacher_top5"].append(teacher(images).topk(k, dim=1).indices)
        out["fractions"].append(flops_per_image(model))
        out["codes"].append(decision_codes(model))
        for part, flops in flops_by_part(model).items():
            out[f"part:{part}"].append(flops)
        for kind, name, gate in model.gates():
            out[f"{kind}:{name}"].append(gate.decisions)
    return {key: torch.cat(values) for key, values in out.items()}


def _accuracy(top5: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent."""
    hit = top5 == labels[:, None]
    return {"top1": 100 * hit[:, 0].float().mean().item(), "top5": 100 * hit.any(1).float().mean().item()}


def _flops_summary(plan: GatePlan, fractions: torch.Tensor, codes: torch.Tensor, gate_flops: torch.Tensor) -> dict:
    """Distribution of per-image FLOPs fractions (quantiles interpolate linearly, as numpy's default), GFLOPs, and
    how much the decisions depend on the image (spread, distinct decision patterns, their entropy)."""
    a = adaptivity(fractions, codes)
    q = {k: a[k] for k in ("p5", "p50", "p95")}
    gflops = plan.total_flops / 1e9
    return {"original_gflops": gflops, "mean_fraction": fractions.mean().item(), **q, "spread": a["spread"],
            "patterns": a["patterns"], "pattern_entropy_bits": a["pattern_entropy_bits"],
            "nearly_static": a["nearly_static"],
            "min": fractions.min().item(), "max": fractions.max().item(),
            "mean_gflops": fractions.mean().item() * gflops, **{f"{k}_gflops": v * gflops for k, v in q.items()},
            "gate_overhead": plan.gate_flops / plan.total_flops,
            "gate_mean_fraction": gate_flops.mean().item() / plan.total_flops,
            "controlled_share": plan.controlled_flops / plan.total_flops}


def _group_entry(group, keep: torch.Tensor | None, block_keep: torch.Tensor | None) -> dict:
    """A channel group; with decisions, its kept channels over all images and over those that ran its block."""
    entry = {"name": group.name, "channels": group.channels}
    if keep is not None:
        ran = block_keep > 0 if block_keep is not None else torch.ones(len(keep), dtype=torch.bool)
        kept = keep.sum(1)
        entry.update(mean_kept=kept.mean().item(), kept_ratio=kept.mean().item() / group.channels,
                     kept_ratio_when_run=kept[ran].mean().item() / group.channels if ran.any() else None)
    return entry


def _shares(c: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each part's (block's, OUTSIDE's, GATES') share of the measured FLOPs."""
    means = {k.removeprefix("part:"): v.mean() for k, v in c.items() if k.startswith("part:")}
    total = float(sum(means.values()))
    return {part: mean.item() / total for part, mean in means.items()}


def _blocks(plan: GatePlan, c: dict[str, torch.Tensor] | None) -> dict:
    """Per-block and per-group entries; with collected decisions `c`, execution rates, kept channels, FLOPs shares."""
    shares = _shares(c) if c else None
    by_block = defaultdict(list)
    for g in plan.groups:
        by_block[g.block if g.block in {b.name for b in plan.blocks} else OUTSIDE].append(g)
    blocks = []
    for b in plan.blocks:
        keep = c[f"layer:{b.name}"][:, 0] if c else None
        blocks.append({"name": b.name, "static_share": b.flops / plan.total_flops,
                       "execution_rate": keep.mean().item() if keep is not None else None,
                       "flops_share": shares[b.name] if shares is not None else None,
                       "groups": [_group_entry(g, c[f"channel:{g.name}"] if c else None, keep)
                                  for g in by_block[b.name]]})
    return {"blocks": blocks,
            "other_groups": [_group_entry(g, c[f"channel:{g.name}"] if c else None, None) for g in by_block[OUTSIDE]],
            "outside_share": shares.get(OUTSIDE, 0.0) if shares is not None else None,
            "gates_share": shares.get(GATES, 0.0) if shares is not None else None}


def _per_class(c: dict[str, torch.Tensor], names: list[str]) -> list[dict]:
    """Image count, mean FLOPs fraction and top-1 of each class present in the data."""
    out = []
    for i, name in enumerate(names):
        mask = c["labels"] == i
        if mask.any():
            out.append({"class": name, "images": int(mask.sum()), "mean_fraction": c["fractions"][mask].mean().item(),
                        "top1": 100 * (c["top5"][mask, 0] == i).float().mean().item()})
    return out


def _cascade_entry(settings: dict | None, c: dict[str, torch.Tensor]) -> dict | None:
    """A cascade run's accuracy and per-image FLOPs with its escalations: the teacher answers, and costs a whole
    fraction more, for every image at or below the threshold (None for runs without escalation)."""
    if settings is None:
        return None
    escalated = escalates(c["confidence"], settings["threshold"])
    fractions = c["fractions"] + escalated.float()
    return {"threshold": settings["threshold"], "budget": settings["budget"],
            "escalated": escalated.float().mean().item(),
            "accuracy": _accuracy(torch.where(escalated[:, None], c["teacher_top5"], c["top5"]), c["labels"]),
            "mean_fraction": fractions.mean().item(),
            **{f"p{p}": fractions.quantile(p / 100).item() for p in (5, 50, 95)}}


def _run_header(run: Path, name: str, config: dict, plan: GatePlan) -> dict:
    gates = config["dynamize"].get("gates_trained") or plan.gates  # a layer-only run of a "both" plan is "layer"
    return {"name": name, "path": str(run.resolve()), "architecture": plan.architecture, "gates": gates,
            "input_size": plan.input_size, "budget": config["dynamize"].get("budget"), "latency": NOT_MEASURED}


def evaluate_run(run: Path, name: str | None = None, data: str | None = None, data_dir: str | None = None,
                 limit: int = 0, batch_size: int = 64) -> RunEvaluation:
    """Evaluate a run and its teacher on the evaluation split (the first `limit` images if > 0).

    Raises:
        RunError: the run or its teacher cannot be loaded.
        DataError: no data given or recorded, unreadable data, or a class count that differs from the model's head.
    """
    run = Path(run)
    config = check_run(run, GATED).config
    spec = data_spec(run, config, data, data_dir)
    model = load(run)
    split = eval_dataset(spec)
    classes = num_classes(split)
    if classes != model.num_classes:
        raise DataError(f"{spec.name} has {classes} classes but {run} has a {model.num_classes}-class head; "
                        "pass the data set the run was trained on with --data")
    ds = first_images(split, limit)
    if len(ds) == 0:
        raise DataError(f"the evaluation split of {spec.name} has no images")
    c = _collect(model, load_teacher(run), loader(ds, batch_size))
    names = class_names(ds, classes)
    teacher = str(Path(config["dynamize"].get("teacher", run)).resolve())
    entry = {**_run_header(run, name or run.resolve().name, config, model.plan),
             "data": {"name": spec.name, "data_dir": spec.data_dir, "img_size": spec.img_size,
                      "images": len(ds), "classes": classes},
             "accuracy": _accuracy(c["top5"], c["labels"]),
             "teacher": {"path": teacher, **_accuracy(c["teacher_top5"], c["labels"])},
             "flops": _flops_summary(model.plan, c["fractions"], c["codes"], c[f"part:{GATES}"]),
             "cascade": _cascade_entry(config["dynamize"].get(CASCADE), c),
             **_blocks(model.plan, c), "per_class": _per_class(c, names)}
    return RunEvaluation(entry, c["fractions"], c["labels"], c["top5"][:, 0], ds, names)


def measure_latency(run: Path, batch_sizes: Sequence[int] = (1, 32), repeats: int = 5) -> list[dict]:
    """Dense vs dynamic wall-clock medians (ms) of a run at each batch size, via `dynamize bench`'s timer.

    The run's learned decisions are taken on random images, so the measured FLOPs fraction can differ from the one
    on the evaluation split; each row records the fraction it was timed at.
    """
    net, dense, size = open_target(str(run), None, None)
    return [r.to_dict() for r in bench(net, dense, Path(run).name, batch_sizes, size, repeats=repeats)]


def evaluate_runs(runs: Sequence[Path], data: str | None = None, data_dir: str | None = None,
                  limit: int = 0, batch_size: int = 64) -> list[RunEvaluation]:
    """Evaluate several runs (see `evaluate_run`); every run, its teacher and its data are checked before the first
    (slow) evaluation, so a bad last run fails at once."""
    for run in runs:
        checked = check_run(run, GATED)
        check_run(checked.teacher)
        data_spec(Path(run), checked.config, data, data_dir)
    return [evaluate_run(run, name, data, data_dir, limit, batch_size) for run, name in zip(runs, run_names(runs))]


def static_entry(run: Path, name: str | None = None) -> dict:
    """A run's plan and FLOPs accounting, without data: what each block and group could cost at most."""
    run = Path(run)
    checked = check_run(run, GATED)
    config, plan = checked.config, checked.gate_plan
    return {**_run_header(run, name or run.resolve().name, config, plan), "data": None, "accuracy": None,
            "teacher": None,
            "flops": {"original_gflops": plan.total_flops / 1e9, "gate_overhead": plan.gate_flops / plan.total_flops,
                      "controlled_share": plan.controlled_flops / plan.total_flops,
                      "max_fraction": 1 + plan.gate_flops / plan.total_flops},
            **_blocks(plan, None), "per_class": None,
            "skipped": [{"kind": s.kind, "where": s.where, "reason": s.reason} for s in plan.skipped]}


def build_report(entries: Sequence[dict], static: bool = False) -> dict:
    """The report.json document around run entries."""
    return {"schema": "dynamize.report", "version": REPORT_VERSION, "kind": "static" if static else "evaluation",
            "created": datetime.datetime.now().isoformat(timespec="seconds"), "dynamize": __version__,
            "flops_definition": FLOPS_DEFINITION, "runs": list(entries)}


def write_report(report: dict, evaluations: Sequence[RunEvaluation], out: Path) -> Path:
    """Write report.json, report.md and (for evaluations) plots/*.png into `out`; each file atomically.

    Other files in `out` are left alone (a directory swap would delete them if -o named a busy folder).

    Raises:
        OutputError: `out` is a file or cannot be written.
    """
    out = Path(out)
    check_output_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        shared, per_run = write_plots(evaluations, out) if evaluations else ({}, {})
        report["plots"] = shared
        for entry in report["runs"]:
            entry["plots"] = per_run.get(entry["name"], {})
        write_json(out / "report.json", report)
        write_text(out / "report.md", render_markdown(report))
    except OSError as e:
        raise OutputError(f"cannot write the report to {out} ({e.strerror}); choose another -o") from None
    return out
