"""The result table says how much the compute depends on the image, and says it plainly when it hardly does; the
plan table says what sets the smallest reachable fraction."""
from rich.console import Console

import dynamize
from dynamize.graph.cost import smallest_budget
from dynamize_cli.tables import print_plan, print_result


def _result(spread: float, static: bool) -> dict:
    adaptivity = {"p5": 0.40, "p50": 0.5, "p95": 0.40 + spread, "spread": spread, "patterns": 3,
                  "pattern_entropy_bits": 1.2, "nearly_static": static}
    return {"eval": {"top1": 90.0, "top5": 99.0, "n": 100, "flops_mean": 0.5, "adaptivity": adaptivity},
            "teacher_eval": {"top1": 91.0, "top5": 99.5}}


def test_adaptive_run_shows_its_spread_without_warning():
    console = Console(record=True, width=200)
    print_result(console, "t", _result(0.12, False), 0.5)
    text = console.export_text()
    assert "p95 - p5 = 0.120" in text and "3 distinct decision patterns" in text and "nearly static" not in text


def test_static_run_is_told_so():
    console = Console(record=True, width=200)
    result = _result(0.01, True)
    result["eval"]["adaptivity"].update(patterns=1, pattern_entropy_bits=0.0)
    print_result(console, "t", result, 0.5)
    text = console.export_text()
    assert "nearly static" in text and "1 distinct decision pattern (0.0 bits)" in text


def test_plan_table_shows_the_smallest_budget_and_what_no_gate_controls():
    plan = dynamize.convert("test_resnet", num_classes=3, img_size=32, gates="layer").plan
    console = Console(record=True, width=300)
    print_plan(plan, "t", console)
    text = console.export_text()
    assert "smallest budget" in text and f"{smallest_budget(plan):.3f} (every gate closed)" in text
    costliest = max((c for c in plan.costs if not (c.block or c.groups)), key=lambda c: c.flops)
    assert "costliest ungated" in text and f"{costliest.node} {100 * costliest.flops / plan.total_flops:.1f}%" in text
