"""dynamize.report against an independent computation on a tiny gated ResNet and image folder."""
import json

import numpy as np
import pytest
import torch
from helpers import make_runs
from matplotlib.image import imread

import dynamize
from dynamize.graph.cost import flops_by_part
from dynamize.reporting.report import REPORT_VERSION, build_report, evaluate_runs, static_entry, write_report
from dynamize.training.data import DataSpec, eval_dataset


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    runs = make_runs(root)
    evaluations = evaluate_runs([runs["run"]], batch_size=10)  # batches that do not divide the 24 images
    out = write_report(build_report([e.entry for e in evaluations]), evaluations, root / "out")
    return runs, json.loads((out / "report.json").read_text()), out


@pytest.fixture(scope="module")
def by_hand(written):
    """Accuracy counted from model outputs, FLOPs from dynamize.flops_fraction, decisions from the gates."""
    runs = written[0]
    model = dynamize.load(runs["run"])
    ds = eval_dataset(DataSpec(str(runs["data"]), None, 32, 3))
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    labels = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        pred, teacher_pred = model(images).argmax(1), runs["base"](images).argmax(1)
    fractions = dynamize.flops_fraction(model, images)
    return {"model": model, "labels": labels, "fractions": fractions,
            "top1": 100 * (pred == labels).float().mean().item(),
            "teacher_top1": 100 * (teacher_pred == labels).float().mean().item(),
            "rates": {b.name: model.block_gate(b.name).last_keep[:, 0].mean().item() for b in model.plan.blocks},
            "kept": {g.name: model.channel_gate(g.name).last_keep.sum(1).mean().item() for g in model.plan.groups},
            "parts": flops_by_part(model)}


def test_numbers_match_independent_computation(written, by_hand):
    _, report, _ = written
    assert report["schema"] == "dynamize.report" and report["version"] == REPORT_VERSION
    (entry,) = report["runs"]
    assert by_hand["fractions"].std() > 0.01, "the fixture's gates should make decisions vary"
    assert entry["budget"] == 0.5 and entry["latency"] == "not measured"
    assert entry["data"]["images"] == len(by_hand["labels"]) == 24
    assert entry["accuracy"]["top1"] == pytest.approx(by_hand["top1"])
    assert entry["teacher"]["top1"] == pytest.approx(by_hand["teacher_top1"])
    f = by_hand["fractions"].numpy()
    flops = entry["flops"]
    assert flops["mean_fraction"] == pytest.approx(f.mean(), rel=1e-5)
    for p in (5, 50, 95):
        assert flops[f"p{p}"] == pytest.approx(np.percentile(f, p), rel=1e-5)
    assert flops["mean_gflops"] == pytest.approx(f.mean() * by_hand["model"].plan.total_flops / 1e9, rel=1e-5)
    for b in entry["blocks"]:
        assert b["execution_rate"] == pytest.approx(by_hand["rates"][b["name"]])
        for g in b["groups"]:
            assert g["mean_kept"] == pytest.approx(by_hand["kept"][g["name"]], rel=1e-5)
    assert {b["name"] for b in entry["blocks"]} == set(by_hand["rates"])
    shares = sum(b["flops_share"] for b in entry["blocks"]) + entry["outside_share"] + entry["gates_share"]
    assert shares == pytest.approx(1.0)
    per_class = entry["per_class"]
    assert sum(c["images"] for c in per_class) == 24
    for i, c in enumerate(per_class):
        assert c["mean_fraction"] == pytest.approx(f[by_hand["labels"].numpy() == i].mean(), rel=1e-5)


def test_flops_parts_add_up_to_flops_per_image(by_hand):
    total = sum(by_hand["parts"].values())
    expected = by_hand["fractions"] * by_hand["model"].plan.total_flops
    assert torch.allclose(total, expected, rtol=1e-5)


def test_plots_are_valid_nonblank_pngs_embedded_in_markdown(written):
    _, report, out = written
    paths = [*report["plots"].values(), *report["runs"][0]["plots"].values()]
    assert len(paths) == 5
    markdown = (out / "report.md").read_text()
    for rel in paths:
        path = out / rel
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert imread(path)[..., :3].std() > 0.02, f"{rel} looks blank"
        assert f"]({rel})" in markdown
    assert f"{report['runs'][0]['accuracy']['top1']:.2f}" in markdown
    assert not [p for p in out.rglob(".*")], "temporary files left behind"


def test_static_entry_needs_no_data(written, tmp_path):
    runs = written[0]
    entry = static_entry(runs["teacher_run"])
    plan = dynamize.load(runs["teacher_run"]).plan
    assert entry["accuracy"] is None and entry["budget"] is None
    assert [b["static_share"] for b in entry["blocks"]] == pytest.approx([b.flops / plan.total_flops
                                                                          for b in plan.blocks])
    assert entry["flops"]["gate_overhead"] == pytest.approx(plan.gate_flops / plan.total_flops)
    out = write_report(build_report([entry], static=True), [], tmp_path / "static")
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
    assert json.loads((out / "report.json").read_text())["kind"] == "static"
