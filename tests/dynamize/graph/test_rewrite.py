"""A converted model is still the user's timm model: same class API, same weight names, plus the gates."""
import copy

import pytest
import timm
import torch
from helpers import randomize

from dynamize.errors import RunError
from dynamize.graph import DynamicNet, DynamicUnit, convert
from dynamize.graph.rewrite import rewrite

MODELS = [("test_resnet", 32), ("test_efficientnet", 64), ("test_convnext", 32), ("densenet121", 32)]


@pytest.fixture(scope="module", params=MODELS, ids=[m for m, _ in MODELS])
def pair(request):
    name, size = request.param
    base = randomize(timm.create_model(name, num_classes=5)).eval()
    return base, convert(base, img_size=size).eval(), size


def test_timm_api_works_on_the_converted_model(pair):
    base, net, size = pair
    x = torch.randn(2, 3, size, size)
    assert isinstance(net, type(base)) and isinstance(net, DynamicNet)
    assert net.pretrained_cfg == base.pretrained_cfg and net.default_cfg == base.default_cfg
    with torch.no_grad():
        features = net.forward_features(x)
        torch.testing.assert_close(features, base.forward_features(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(net.forward_head(features), base(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(net.forward_head(features, pre_logits=True),
                                   base.forward_head(features, pre_logits=True), atol=1e-5, rtol=0)
    net = copy.deepcopy(net)
    net.reset_classifier(3)
    assert net.num_classes == 3 and net.get_classifier().out_features == 3
    with torch.no_grad():
        assert net(x).shape == (2, 3)


def test_weight_names_are_timm_names_plus_gates(pair):
    base, net, _ = pair
    keys, base_keys = set(net.state_dict()), set(base.state_dict())
    assert base_keys <= keys
    extra = keys - base_keys
    assert extra and all(".lnets." in k or ".cnets." in k for k in extra)
    assert set(net.base_state_dict()) == base_keys


def test_only_units_are_swapped(pair):
    base, net, _ = pair
    units = dict(net.units())
    assert units and all(isinstance(u, DynamicUnit) for u in units.values())
    for name, module in net.named_modules():
        if name and not any(name == u or name.startswith(u + ".") for u in units):
            assert type(module) is type(base.get_submodule(name)), name


def test_a_copy_runs_its_own_weights(pair):
    _, net, size = pair
    twin = copy.deepcopy(net)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        before = twin(x)
        for p in net.parameters():
            p.add_(0.5)
        torch.testing.assert_close(twin(x), before)
        assert not torch.allclose(net(x), before)
        for p in net.parameters():
            p.sub_(0.5)


@pytest.mark.parametrize("field", ["producer", "members", "sinks", "exits"])
def test_a_plan_naming_a_node_the_model_lacks_is_refused_when_replayed(field):
    base = timm.create_model("test_resnet", num_classes=3)
    plan = convert(base, img_size=32, residual_outputs=True).plan
    group = next(g for g in plan.groups if g.exits)
    setattr(group, field, "nosuch" if field == "producer" else [*getattr(group, field), "nosuch"])
    with pytest.raises(RunError, match="names node 'nosuch'"):
        rewrite(base, plan)
