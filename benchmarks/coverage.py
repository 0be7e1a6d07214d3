"""Coverage of timm CNNs: the share of architectures that `dynamize.convert` gates, exactly and reloadably.

Each architecture is built with random weights (norm statistics and residual gains randomised, so every branch
contributes), converted at a small input size, and counted as covered when it gets at least one gate, computes what
the original computed with its gates open (within 1e-5 of the output's magnitude, both in float64; in float32 within
what float32 rounding alone moves the original's output, `float32_agrees`), and returns the same outputs after
`dynamize.save` / `dynamize.load`.
A refusal (`ModelError`) is not covered but names its reason; anything else raised is a crash. No test names these
architectures: the architecture sweep in tests/dynamize/graph/test_convert.py uses a different list.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/coverage.py [--archs NAME ...] [--json coverage.json]
"""
import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from rich.console import Console
from rich.table import Table

import dynamize
from dynamize.errors import ModelError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import randomize  # noqa: E402  (the tests' weight randomiser: residual branches must contribute)

# architecture -> input size (px). One or two per timm CNN family; none is named by a test.
ARCHS = {
    # ResNet and its variants
    "resnet26": 64, "resnet34d": 64, "resnet101": 64, "wide_resnet50_2": 64, "resnetblur18": 64, "resnetaa34d": 64,
    "resnetrs50": 64, "ecaresnetlight": 64, "seresnet50": 64, "seresnext26d_32x4d": 64, "legacy_seresnet18": 64,
    "resnetv2_50": 64, "resnetv2_50x1_bit": 64, "resnetv2_50d_evos": 64, "skresnet34": 64, "skresnext50_32x4d": 64,
    "res2next50": 64, "resnest26d": 64, "tresnet_m": 64, "nf_resnet50": 64, "nf_regnet_b0": 64, "eca_nfnet_l0": 64,
    "dm_nfnet_f0": 64,
    # byobnet (ResNet-style blocks from one config), RegNet
    "resnet33ts": 64, "gcresnext26ts": 64, "gernet_m": 64, "repvgg_b0": 64, "mobileone_s1": 64,
    "regnetx_004": 64, "regnety_004": 64, "regnetz_b16": 64, "regnetv_040": 64,
    # mobile nets
    "mobilenetv1_125": 64, "mobilenetv2_050": 64, "mobilenetv3_large_100": 64, "tf_mobilenetv3_small_minimal_100": 64,
    "mobilenetv4_conv_small": 64, "efficientnet_b1": 64, "tf_efficientnet_b0": 64, "efficientnet_es": 64,
    "efficientnetv2_rw_t": 64, "efficientnet_lite1": 64, "mixnet_m": 64, "mnasnet_small": 64, "semnasnet_075": 64,
    "spnasnet_100": 64, "tinynet_a": 64, "fbnetc_100": 64, "fbnetv3_d": 64, "lcnet_075": 64, "hardcorenas_a": 64,
    "ghostnet_050": 64, "ghostnetv3_100": 64, "rexnetr_100": 64, "repghostnet_050": 64,
    # multi-branch, dense and plain nets
    "dla46_c": 64, "dla60x_c": 64, "dpn68b": 64, "densenetblur121d": 64, "vgg13_bn": 32, "cspresnext50": 64,
    "cspdarknet53": 64, "cs3darknet_s": 64, "darknet53": 64, "hrnet_w18_small_v2": 64, "inception_v4": 96,
    "inception_resnet_v2": 96, "xception41": 64, "selecsls42": 64, "ese_vovnet19b_dw": 64, "vovnet39a": 64,
    "hgnet_tiny": 64, "hgnetv2_b1": 64,
    # ConvNeXt and other recent CNNs
    "convnext_femto": 64, "convnextv2_femto": 64, "fasternet_t0": 64, "starnet_s1": 64, "inception_next_atto": 64,
}


def float32_agrees(error: float, rounding: float) -> bool:
    """Whether the converted model's float32 error (of the output's magnitude) is one float32 rounding could cause.

    `rounding` is how far the original's own output moves when its input moves by 1e-7 (about one float32 ulp): a
    chaotic random-init net amplifies rounding that far, so the fast path's folded norms may be off by as much (ten
    times, for margin); a well-conditioned one must agree within 1e-5.
    """
    return error <= max(1e-5, 10 * rounding)


def _relative(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


def check(name: str, size: int) -> dict:
    """Convert one architecture and say whether it is covered, with its gate counts or the reason it is not."""
    row = {"architecture": name, "img_size": size}
    start = time.perf_counter()
    try:
        base = randomize(timm.create_model(name, num_classes=7)).eval()
        net = dynamize.convert(base, img_size=size).eval()
        x = torch.randn(2, net.plan.input_size[0], size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            # Exactness in float64, on copies (a copy builds its own fast path, for its own dtype): random norm
            # statistics make some deep nets chaotic, so that float32 rounding alone (the runtime's folded norms
            # round otherwise than conv-then-norm) moves the logits far past 1e-5. efficientnetv2_rw_t at 64 px:
            # the original model's own output moves by 0.43 of its magnitude when its input moves by 1e-7.
            ref, got = copy.deepcopy(base).double()(x.double()), copy.deepcopy(net).double()(x.double())
            exact = bool((got - ref).abs().max() <= 1e-5 * ref.abs().max())
            out, ref32 = net(x), base(x)
            float32_error, rounding = _relative(out, ref32), _relative(base(x * (1 + 1e-7)), ref32)
            exact = exact and float32_agrees(float32_error, rounding)
            with tempfile.TemporaryDirectory() as tmp:
                loaded = dynamize.load(dynamize.save(net, Path(tmp) / "run"))
                reloads = torch.equal(loaded.eval()(x), out)
        summary = net.plan.summary()
        row.update(blocks=summary["blocks"], groups=summary["groups"], controlled=round(summary["controlled_share"], 3),
                   exact=exact, float32_error=float32_error, float32_rounding=rounding, reloads=reloads,
                   result="gated" if exact and reloads else "wrong")
    except ModelError as e:
        row.update(result="refused", reason=str(e))
    except Exception as e:  # a crash is a finding, reported in the table rather than stopping the run
        row.update(result="crash", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def table(rows: list[dict]) -> Table:
    t = Table("architecture", "px", "result", "L-Nets", "C-Nets", "FLOPs gated", "s", "reason")
    for r in rows:
        gated = r["result"] == "gated"
        t.add_row(r["architecture"], str(r["img_size"]), r["result"], str(r.get("blocks", "")),
                  str(r.get("groups", "")), f"{r['controlled']:.0%}" if gated else "", f"{r['seconds']:.1f}",
                  _short(r.get("reason", "")))
    return t


def _short(reason: str) -> str:
    """A refusal's reasons without the model name and the list of supported families."""
    return reason.split("; supported:")[0].split(" can gate with --gates both: ")[-1][:110]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), help="a subset of the list (default: all)")
    parser.add_argument("--json", help="also write the rows as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more than the free cores is slow)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=160)
    console.print(f"dynamize {dynamize.__version__}, timm {timm.__version__}, torch {torch.__version__}, "
                  f"{torch.get_num_threads()} thread(s), {time.strftime('%Y-%m-%d %H:%M')}")
    rows = []
    for name in args.archs:
        rows.append(check(name, ARCHS.get(name, 64)))
        r = rows[-1]
        console.print(f"{name}: {r['result']} {r.get('blocks', '')}/{r.get('groups', '')} {r['seconds']:.1f}s "
                      f"{_short(r.get('reason', ''))}")
    console.print(table(rows))
    covered = sum(r["result"] == "gated" for r in rows)
    console.print(f"coverage: {covered}/{len(rows)} = {covered / len(rows):.1%} of the architectures are gated")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
