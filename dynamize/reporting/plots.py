"""The report's figures, drawn headless (matplotlib's Agg canvas through `Figure`, no pyplot state or display).

Each figure is saved under a temporary name and renamed, so a reader never sees half a PNG.
"""
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..io.atomic import write_file

GRID = 16  # images per side of the cheapest / most expensive grid


def _save(fig: Figure, path: Path) -> None:
    write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def flops_histogram(fractions: torch.Tensor, budget, title: str, path: Path) -> None:
    """Histogram of per-image FLOPs fractions, with the mean and (if any) the budget marked."""
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.hist(fractions.numpy(), bins=min(50, max(10, len(fractions) // 20)), color="tab:blue", alpha=0.8)
    ax.axvline(fractions.mean().item(), color="black", linestyle=":", label=f"mean {fractions.mean().item():.3f}")
    if budget is not None:
        ax.axvline(budget, color="tab:red", linestyle="--", label=f"budget {budget:.2f}")
    ax.set(xlabel="FLOPs fraction of the original model", ylabel="images", title=title)
    ax.legend()
    _save(fig, path)


def depth_profile(entry: dict, path: Path) -> None:
    """Per-block execution rate and per-group kept-channel ratio, in network order."""
    fig = Figure(figsize=(max(6, 0.35 * len(entry["blocks"]) + 2), 6), layout="constrained")
    top, bottom = fig.subplots(2, 1)
    blocks = entry["blocks"]
    top.bar(range(len(blocks)), [b["execution_rate"] for b in blocks], color="tab:green")
    top.set_xticks(range(len(blocks)), [b["name"] for b in blocks], rotation=90, fontsize=7)
    top.set(ylim=(0, 1.05), ylabel="execution rate", title=f"{entry['name']}: blocks (L-Net)")
    groups = [g for b in blocks for g in b["groups"]] + entry["other_groups"]
    x = torch.arange(len(groups)).numpy()
    bottom.bar(x - 0.2, [g["kept_ratio"] for g in groups], width=0.4, label="all images")
    bottom.bar(x + 0.2, [g["kept_ratio_when_run"] or 0.0 for g in groups], width=0.4, label="when the block runs")
    bottom.set_xticks(x, [g["name"] for g in groups], rotation=90, fontsize=7)
    bottom.set(ylim=(0, 1.05), ylabel="kept channel ratio", title="channel groups (C-Net)")
    bottom.legend(fontsize=7)
    _save(fig, path)


def accuracy_vs_flops(entries: Sequence[dict], path: Path) -> None:
    """Top-1 against mean FLOPs fraction (bars: p5-p95) for every run, each distinct teacher as a point at 1.0."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for e in sorted(entries, key=lambda e: e["flops"]["mean_fraction"]):
        f = e["flops"]
        ax.errorbar(f["mean_fraction"], e["accuracy"]["top1"], fmt="o", capsize=3, label=e["name"],
                    xerr=[[max(0.0, f["mean_fraction"] - f["p5"])], [max(0.0, f["p95"] - f["mean_fraction"])]])
    teachers = {e["teacher"]["path"]: e for e in entries}
    for e in teachers.values():
        label = "teacher" if len(teachers) == 1 else f"teacher of {e['name']}"
        ax.plot(1.0, e["teacher"]["top1"], marker="*", markersize=14, linestyle="none", color="black", label=label)
    ax.set(xlabel="FLOPs fraction (mean; bars p5-p95)", ylabel="top-1 %", title="accuracy vs FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def per_class(rows: Sequence[dict], title: str, path: Path) -> None:
    """Mean FLOPs fraction of each class's images."""
    fig = Figure(figsize=(max(6, 0.3 * len(rows) + 2), 3.5), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(rows)), [r["mean_fraction"] for r in rows], color="tab:purple")
    if len(rows) <= 60:  # beyond that, labels overlap into a black band
        ax.set_xticks(range(len(rows)), [r["class"] for r in rows], rotation=90, fontsize=7)
    ax.set(xlabel="class", ylabel="mean FLOPs fraction", title=title)
    _save(fig, path)


def _show(ax, image: torch.Tensor) -> None:
    """Draw a normalised CHW tensor, stretched to [0, 1] per image (the transform's normalisation is not undone)."""
    img = image - image.min()
    img = img / img.max().clamp_min(1e-8)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img[:3].permute(1, 2, 0).numpy())
    ax.set_axis_off()


def extremes(ev, path: Path) -> None:
    """The GRID cheapest and GRID most expensive images, each titled with its label, prediction and FLOPs."""
    order = ev.fractions.argsort()
    n = min(GRID, len(order))
    fig = Figure(figsize=(12, 7))
    # Fixed spacing: constrained layout over 32 axes costs seconds.
    sides = fig.subfigures(1, 2, squeeze=False, wspace=0.05)[0]
    for side, (title, idx) in zip(sides, (("cheapest", order[:n]), ("most expensive", order.flip(0)[:n]))):
        side.suptitle(f"{ev.entry['name']}: {n} {title} images")
        axes = side.subplots(4, 4, gridspec_kw={"hspace": 0.45, "wspace": 0.1, "top": 0.88, "bottom": 0.02}).flatten()
        for ax in axes:
            ax.set_axis_off()
        for ax, i in zip(axes, idx.tolist()):
            _show(ax, ev.dataset[i][0])
            label, pred = ev.class_names[ev.labels[i]], ev.class_names[ev.predictions[i]]
            ax.set_title(f"{label}" + ("" if label == pred else f" (pred {pred})") + f"\n{ev.fractions[i]:.3f}",
                         fontsize=7, color="black" if label == pred else "tab:red")
    _save(fig, path)


def write_plots(evaluations, out: Path) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Draw every figure into `out/plots/`; paths relative to `out`: (report-wide plots, {run name: its plots})."""
    (out / "plots").mkdir(exist_ok=True)
    per_run = {}
    for ev in evaluations:
        e, name = ev.entry, ev.entry["name"]
        paths = {kind: f"plots/{name}-{kind}.png" for kind in ("flops_histogram", "depth", "per_class", "extremes")}
        flops_histogram(ev.fractions, e["budget"], f"{name}: per-image FLOPs", out / paths["flops_histogram"])
        depth_profile(e, out / paths["depth"])
        per_class(e["per_class"], f"{name}: mean FLOPs fraction per class", out / paths["per_class"])
        extremes(ev, out / paths["extremes"])
        per_run[name] = paths
    shared = {"accuracy_vs_flops": "plots/accuracy_vs_flops.png"}
    accuracy_vs_flops([ev.entry for ev in evaluations], out / shared["accuracy_vs_flops"])
    return shared, per_run
