"""Loading user weights: strict for the backbone, a classifier of another size re-initialised for transfer."""
import pytest
import timm
import torch

from dynamize.errors import ModelError
from dynamize.models import load_backbone


def test_load_backbone_keeps_new_head_and_loads_the_rest():
    source = timm.create_model("test_resnet", num_classes=1000).state_dict()
    model = timm.create_model("test_resnet", num_classes=3)
    head_before = model.get_classifier().weight.clone()
    load_backbone(model, source)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in source.items() if not k.startswith("fc."))
    assert torch.equal(model.get_classifier().weight, head_before)


def test_load_backbone_is_strict_elsewhere():
    source = timm.create_model("test_resnet", num_classes=1000).state_dict()
    source.pop("conv1.0.weight")
    with pytest.raises(ModelError, match="missing"):
        load_backbone(timm.create_model("test_resnet", num_classes=3), source)
