"""Rich renderings of GatePlans, shared by the commands that print them."""
from collections import defaultdict

from rich.console import Console, Group
from rich.table import Table

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
    t.add_row("FLOPs under gate control", f"{100 * s['controlled_share']:.1f}%")
    t.add_row("gate overhead", f"{100 * s['gate_overhead']:.3f}% of FLOPs")
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
