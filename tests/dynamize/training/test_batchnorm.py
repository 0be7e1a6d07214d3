"""BatchNorm re-estimation: running statistics recomputed for the model's own decisions."""
import timm
import torch
from helpers import randomize

import dynamize
from dynamize.training.batchnorm import reestimate_batchnorm


def test_reestimation_replaces_running_statistics_with_the_data_average():
    net = dynamize.convert(randomize(timm.create_model("test_resnet", num_classes=3)), img_size=32).eval()
    images = torch.randn(24, 3, 32, 32) * 2 + 1
    data = [(images[i:i + 8], torch.zeros(8)) for i in range(0, 24, 8)]
    stem_bn = net.bn1 if isinstance(net.bn1, torch.nn.BatchNorm2d) else next(
        m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = stem_bn.running_mean.clone()
    with torch.no_grad():
        inputs = []
        handle = stem_bn.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
        used = reestimate_batchnorm(net, data, images=20)
        handle.remove()
    assert used == 16 and not net.training  # whole batches of 8 only
    seen = torch.cat(inputs)
    assert seen.shape[0] == 16
    torch.testing.assert_close(stem_bn.running_mean, seen.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stem_bn.running_var, seen.var((0, 2, 3)), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(stem_bn.running_mean, before)
    assert "forward" not in vars(stem_bn)  # the norm runs its own forward again


def test_a_norm_inside_a_skipped_block_averages_over_the_images_that_run_it():
    net = dynamize.convert(randomize(timm.create_model("test_resnet", num_classes=3)), img_size=32).eval()
    block = net.plan.blocks[-1]
    gate = net.block_gate(block.name)
    bn = net.get_submodule(block.unit).get_submodule(next(
        n for n in block.branch_nodes if isinstance(getattr(net.get_submodule(block.unit), n, None),
                                                    torch.nn.BatchNorm2d)))
    runs = [torch.tensor([[1.0], [0.0], [0.0], [1.0]]), torch.tensor([[1.0], [1.0], [0.0], [1.0]])]
    batches = [(torch.randn(4, 3, 32, 32), torch.zeros(4)) for _ in runs]

    def forcing():  # sets each batch's decisions as the loader yields it
        for decisions, batch in zip(runs, batches):
            gate.forced = decisions
            yield batch

    inputs = []
    handle = bn.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
    try:
        reestimate_batchnorm(net, forcing(), images=8)
    finally:
        handle.remove()
        gate.forced = None
    expected = torch.cat(inputs)
    assert expected.shape[0] == 5  # 2 + 3 images ran the block, as at inference: a per-image, not per-batch, average
    torch.testing.assert_close(bn.running_mean, expected.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)
