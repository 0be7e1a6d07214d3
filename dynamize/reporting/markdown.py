"""report.md, and the table rows it shares with the terminal output (the CLI renders the same rows with Rich)."""
from collections.abc import Sequence

SUMMARY_HEADER = ("", "teacher (original)", "dynamic")
BLOCK_HEADER = ("block", "execution rate", "kept channels (mean / all)", "share of FLOPs", "static share")
STATIC_BLOCK_HEADER = ("block", "channel groups", "static share")
COMPARISON_HEADER = ("run", "budget", "top-1 %", "top-5 %", "teacher top-1 %", "FLOPs mean", "p50", "p95", "GFLOPs")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _budget(entry: dict) -> str:
    return "-" if entry["budget"] is None else f"{entry['budget']:.2f}"


def summary_rows(entry: dict) -> list[tuple[str, str, str]]:
    """(metric, teacher, dynamic) rows of one evaluated run."""
    f, acc, t = entry["flops"], entry["accuracy"], entry["teacher"]
    gf = f["original_gflops"]
    return [
        ("top-1 %", f"{t['top1']:.2f}", f"{acc['top1']:.2f}"),
        ("top-5 %", f"{t['top5']:.2f}", f"{acc['top5']:.2f}"),
        ("budget asked", "-", _budget(entry)),
        ("FLOPs fraction mean", "1.000", f"{f['mean_fraction']:.3f}"),
        ("FLOPs fraction p5 / p50 / p95", "1.000", f"{f['p5']:.3f} / {f['p50']:.3f} / {f['p95']:.3f}"),
        ("per-image adaptivity", "-", adaptivity_text(f)),
        ("GFLOPs / image (mean)", f"{gf:.4f}", f"{f['mean_gflops']:.4f}"),
        ("GFLOPs / image p5 / p50 / p95", f"{gf:.4f}",
         f"{f['p5_gflops']:.4f} / {f['p50_gflops']:.4f} / {f['p95_gflops']:.4f}"),
        ("gate overhead (all gates / measured)", "-", f"{_pct(f['gate_overhead'])} / {_pct(f['gate_mean_fraction'])}"),
        ("latency dense / dynamic (speedup)", "-", _latency(entry["latency"])),
        *_cascade_rows(entry.get("cascade")),
    ]


def _cascade_rows(cascade: dict | None) -> list[tuple[str, str, str]]:
    """A cascade's figures with its escalations to the teacher (the rows above are its gated network's alone)."""
    if cascade is None:
        return []
    return [("with escalation to the teacher: budget / escalated", "-",
             f"{cascade['budget']:.2f} / {_pct(cascade['escalated'])}"),
            ("with escalation: top-1 / top-5 %", "-",
             f"{cascade['accuracy']['top1']:.2f} / {cascade['accuracy']['top5']:.2f}"),
            ("with escalation: FLOPs mean, p5 / p50 / p95", "-",
             f"{cascade['mean_fraction']:.3f}, {cascade['p5']:.3f} / {cascade['p50']:.3f} / {cascade['p95']:.3f}")]


def adaptivity_text(f: dict) -> str:
    """Spread, decision patterns and entropy, and a plain warning when the decisions hardly depend on the image."""
    text = (f"p95 - p5 = {f['spread']:.3f}; {f['patterns']} decision patterns "
            f"({f['pattern_entropy_bits']:.1f} bits)")
    return text + ("; NEARLY STATIC: about the same compute for every image" if f["nearly_static"] else "")


def _latency(latency) -> str:
    if isinstance(latency, str):
        return latency
    return "; ".join(f"batch {r['batch_size']}: {r['dense_ms']:.1f} / {r['dynamic_ms']:.1f} ms ({r['speedup']:.2f}x)"
                     for r in latency)


def _groups(groups: Sequence[dict]) -> str:
    return ", ".join(f"{g['name']} {g['mean_kept']:.1f}/{g['channels']}" for g in groups) or "-"


def block_rows(entry: dict) -> list[tuple[str, ...]]:
    """Per-block rows of an evaluated run, then the FLOPs outside gated blocks and of the gates themselves."""
    rows: list[tuple[str, ...]] = [(b["name"], f"{b['execution_rate']:.3f}", _groups(b["groups"]),
                                    _pct(b["flops_share"]), _pct(b["static_share"])) for b in entry["blocks"]]
    static_outside = 1 - sum(b["static_share"] for b in entry["blocks"])
    rows.append(("(outside gated blocks)", "1.000", _groups(entry["other_groups"]), _pct(entry["outside_share"]),
                 _pct(static_outside)))
    rows.append(("(the gates themselves)", "", "", _pct(entry["gates_share"]), _pct(entry["flops"]["gate_overhead"])))
    return rows


def static_block_rows(entry: dict) -> list[tuple[str, ...]]:
    """Per-block rows of a plan-only report: the groups each block holds and its share of the original FLOPs."""
    def groups(gs):
        return ", ".join(f"{g['name']} ({g['channels']})" for g in gs) or "-"
    rows: list[tuple[str, ...]] = [(b["name"], groups(b["groups"]), _pct(b["static_share"])) for b in entry["blocks"]]
    outside = 1 - sum(b["static_share"] for b in entry["blocks"])
    rows.append(("(outside gated blocks)", groups(entry["other_groups"]), _pct(outside)))
    return rows


def _deployed(e: dict) -> tuple[str, str, dict, dict]:
    """Name, budget, accuracy and FLOPs (mean_fraction, p50, p95) of what a run deploys: a cascade with its
    escalations, any other run as it is."""
    c = e.get("cascade")
    if c is None:
        return e["name"], _budget(e), e["accuracy"], e["flops"]
    return f"{e['name']} (with escalation)", f"{c['budget']:.2f}", c["accuracy"], c


def comparison_rows(entries: Sequence[dict]) -> list[tuple[str, ...]]:
    """One row per run as deployed (a cascade with its escalations), sorted by mean FLOPs fraction."""
    rows = []
    for e in entries:
        name, budget, acc, f = _deployed(e)
        rows.append((f["mean_fraction"], (name, budget, f"{acc['top1']:.2f}", f"{acc['top5']:.2f}",
                                          f"{e['teacher']['top1']:.2f}", f"{f['mean_fraction']:.3f}",
                                          f"{f['p50']:.3f}", f"{f['p95']:.3f}",
                                          f"{f['mean_fraction'] * e['flops']['original_gflops']:.4f}")))
    return [row for _, row in sorted(rows, key=lambda r: r[0])]


def static_rows(entry: dict) -> list[tuple[str, str]]:
    """Headline numbers of a plan-only report."""
    f = entry["flops"]
    return [("architecture", entry["architecture"]), ("gates", entry["gates"]),
            ("input size", "x".join(map(str, entry["input_size"]))), ("budget asked", _budget(entry)),
            ("original GFLOPs / image", f"{f['original_gflops']:.4f}"),
            ("FLOPs under gate control", _pct(f["controlled_share"])),
            ("gate overhead (all gates)", _pct(f["gate_overhead"])),
            ("most FLOPs an image can cost", f"{f['max_fraction']:.3f} of the original")]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _run_section(entry: dict) -> str:
    out = [f"## {entry['name']}\n", f"`{entry['path']}`: {entry['architecture']}, gates {entry['gates']}, "
           f"input {'x'.join(map(str, entry['input_size']))}.\n"]
    if entry["accuracy"] is None:
        out += [_table(("", "value"), static_rows(entry)), "### Blocks\n", _table(STATIC_BLOCK_HEADER,
                                                                                  static_block_rows(entry))]
        return "\n".join(out)
    d = entry["data"]
    out += [f"Evaluated on {d['images']} images of `{d['name']}` ({d['classes']} classes); teacher: "
            f"`{entry['teacher']['path']}`.\n", _table(SUMMARY_HEADER, summary_rows(entry)),
            "### Blocks\n", "Execution rate: share of images that run the block. Kept channels: mean over all images "
            "(0 when the block is skipped). Share of FLOPs: of this run's measured mean.\n",
            _table(BLOCK_HEADER, block_rows(entry)), "### Plots\n"]
    titles = {"flops_histogram": "per-image FLOPs", "depth": "execution and kept channels along depth",
              "per_class": "mean FLOPs fraction per class", "extremes": "cheapest and most expensive images"}
    out += [f"![{titles[k]}]({path})\n" for k, path in entry.get("plots", {}).items()]
    return "\n".join(out)


def render_markdown(report: dict) -> str:
    """report.md: the same numbers as report.json, readable, with the plots embedded."""
    runs = report["runs"]
    out = [f"# dynamize report ({report['kind']})\n",
           f"Created {report['created']} by dynamize {report['dynamize']}; report schema version {report['version']}."
           f" {report['flops_definition']}.\n"]
    if report["kind"] == "evaluation" and len(runs) > 1:
        out += ["## Comparison\n", _table(COMPARISON_HEADER, comparison_rows(runs))]
    if "accuracy_vs_flops" in report.get("plots", {}):
        out.append(f"![accuracy vs FLOPs]({report['plots']['accuracy_vs_flops']})\n")
    out += [_run_section(e) for e in runs]
    return "\n".join(out)
