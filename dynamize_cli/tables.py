"""Rich renderings shared by the commands: gate plans and training results."""
from collections import defaultdict

from rich.console import Console, Group
from rich.table import Table

from dynamize.graph.cost import smallest_budget
from dynamize.graph.plan import GatePlan


def plan_summary(plan: GatePlan, title: str) -> Table:
    """The headline table: what was gated, how much of the model it controls, what the gates cost."""
    s = plan.summary()
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row("architecture", plan.architecture)
    t.add_row("gates", plan.gates)
    t.add_row("input size", "x".join(map(str, plan.input_size)))
    t.add_row("original FLOPs / image", f"{plan.total_flops / 1e9:.3f} GFLOPs ({plan.total_flops / 2e9:.3f} GMACs)")
    t.add_row("blocks gated (L-Net)", str(s["blocks"]))
    t.add_row("channel groups gated (C-Net)", str(s["groups"]))
    if plan.channel_mode == "width":
        t.add_row("groups in width mode", f"{sum(bool(g.widths) for g in plan.groups)} (the others per channel)")
    t.add_row("FLOPs under gate control", f"{100 * s['controlled_share']:.1f}%")
    t.add_row("costliest ungated", plan.largest_ungated() or "-")
    t.add_row("gate overhead", f"{100 * s['gate_overhead']:.3f}% of FLOPs")
    t.add_row("smallest budget", f"{smallest_budget(plan):.3f} (every gate closed)")
    return t


def skipped_table(plan: GatePlan) -> Table:
    """What could not be gated, grouped by reason."""
    reasons = defaultdict(list)
    for s in plan.skipped:
        reasons[(s.kind, s.reason)].append(s.where)
    t = Table(title="Not gated", title_justify="left")
    for col in ("kind", "reason", "count", "where (first 3)"):
        t.add_column(col)
    for (kind, reason), where in sorted(reasons.items()):
        t.add_row(kind, reason, str(len(where)), ", ".join(where[:3]))
    return t


def print_plan(plan: GatePlan, title: str, console: Console) -> None:
    console.print(Group(plan_summary(plan, title), skipped_table(plan)))


def result_table(title: str, result: dict, budget: float | None = None, name: str = "dynamic") -> Table:
    """Accuracy and FLOPs of a trained, fine-tuned or calibrated model (and its teacher; for a cascade, its gated
    network alone) on the test split."""
    t = Table(title=title, title_justify="left")
    for col in ("model", "top-1 %", "top-5 %", "FLOPs mean", "p5 / p50 / p95"):
        t.add_column(col, justify="right")
    if "teacher_eval" in result:
        e = result["teacher_eval"]
        t.add_row("teacher (original)", f"{e['top1']:.2f}", f"{e['top5']:.2f}", "1.000", "1.000")
    rows = [("gated network alone", result["gated_eval"])] if "gated_eval" in result else []
    for label, e in [*rows, (name + (f" (budget {budget:.2f})" if budget else ""), result["eval"])]:
        a = e.get("adaptivity")
        quantiles = f"{a['p5']:.3f} / {a['p50']:.3f} / {a['p95']:.3f}" if a else "-"
        t.add_row(label, f"{e['top1']:.2f}", f"{e['top5']:.2f}", f"{e.get('flops_mean', 1):.3f}", quantiles)
    return t


def print_result(console: Console, title: str, result: dict, budget: float | None = None,
                 name: str = "dynamic") -> None:
    """The result table, then how much the compute depends on the image, said plainly when it hardly does."""
    console.print(result_table(title, result, budget, name))
    a = result["eval"].get("adaptivity")
    if a:
        patterns = a.get("patterns", 0)
        console.print(f"per-image FLOPs: p95 - p5 = {a['spread']:.3f}, {patterns} distinct decision "
                      f"pattern{'' if patterns == 1 else 's'} ({a.get('pattern_entropy_bits', 0):.1f} bits) on "
                      f"{result['eval']['n']} images")
        if a["nearly_static"]:
            console.print("[yellow]warning:[/yellow] the decisions are nearly static: every image costs about the "
                          "same (p95 - p5 < 0.02); this is pruning, not adaptive inference. Train longer, or raise "
                          "shaping_weight")
