"""How a batch runs a channel group: every channel, the batch's union, or per image, from the gate's decisions."""
import pytest
import torch

from dynamize.graph.gates import Gate
from dynamize.runtime import decide as decide_module
from dynamize.runtime.decide import Decide, decisions

C = 6


@pytest.fixture(autouse=True)
def exact_counts(monkeypatch, request):
    """Channel counts as kept (no rounding up to a bucket), except in the test of the rounding."""
    if "bucket" not in request.node.name:
        monkeypatch.setattr(decide_module, "CHANNEL_BUCKET", 1)


def _decide(forced, mode="auto", macs=1e6, gather=1.0, side=16):
    gate = Gate(4, C, 8)
    gate.forced = torch.tensor(forced, dtype=torch.float32)
    decide = Decide(gate, axis=1, macs=macs, area=side * side, gather=gather, mode=mode)
    n = len(forced)
    return decide(torch.randn(n, 4), torch.randn(n, 4, side, side))


def test_every_channel_kept_runs_full_width():
    kept = _decide([[1] * C, [1] * C])
    assert kept.idx is None and kept.mult.shape == (2, C)


def test_union_keeps_what_any_image_keeps_and_zeroes_the_rest():
    kept = _decide([[1, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0]], mode="union")
    assert kept.idx.tolist() == [[0, 2, 3]] and not kept.per_image
    assert (kept.mult == torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])).all()


def test_per_image_pads_with_dropped_channels_at_zero():
    kept = _decide([[1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 0, 0]], mode="split")
    assert kept.per_image and kept.idx.shape == (2, 3)
    assert kept.idx[0].tolist() == [0, 2, 5] and kept.idx[1, 0] == 3  # kept channels first, in channel order
    assert kept.mult[1].tolist() == [1.0, 0.0, 0.0] and len(set(kept.idx[1].tolist())) == 3


def test_a_group_that_drops_everything_still_runs_one_channel_at_zero():
    for mode in ("union", "split"):
        kept = _decide([[0] * C, [0] * C], mode=mode)
        assert kept.idx.shape[1] == 1 and (kept.mult == 0).all()


def test_cost_model_picks_by_batch_disagreement_and_map_size():
    disagree = [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]]
    assert _decide(disagree).per_image  # the union is every channel; per image halves the work
    assert _decide(disagree, side=2).idx is None  # ... but batch-1 convolutions on a tiny map are too slow
    agree = [[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert not _decide(agree).per_image and _decide(agree).idx.tolist() == [[0, 1]]
    # Gathering the weights costs more than the dropped channels save (a tiny map): run every channel.
    assert _decide([[1, 1, 1, 1, 0, 0]], macs=10, gather=1e6).idx is None


def test_kept_counts_round_up_to_a_bucket_of_dropped_channels(monkeypatch):
    monkeypatch.setattr(decide_module, "CHANNEL_BUCKET", 4)
    kept = _decide([[1, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0]], mode="union")
    assert kept.idx[0, :3].tolist() == [0, 2, 3] and kept.idx.shape == (1, 4) and kept.mult[:, 3].eq(0).all()
    assert _decide([[1, 1, 1, 1, 1, 0]], mode="union").idx is None  # rounded up to every channel


@pytest.mark.parametrize("case", ["learned", "min_keep", "forced", "inactive"])
def test_decisions_equal_the_gate_in_evaluation(case):
    gate = Gate(5, C, 8, min_keep=3 if case == "min_keep" else 0).eval()
    torch.nn.init.normal_(gate.mlp[-1].weight)  # decisions that differ between channels and images
    if case == "forced":
        gate.forced = torch.tensor([[1.0, 0, 1, 0, 0, 1]])
    if case == "inactive":
        gate.active.fill_(False)
    pooled = torch.randn(4, 5)
    with torch.no_grad():
        keep, scale = decisions(gate, pooled)
        expected_keep, expected_scale = gate(pooled)
    assert torch.equal(keep, expected_keep) and torch.equal(gate.last_keep, expected_keep)
    torch.testing.assert_close(scale, expected_scale)
