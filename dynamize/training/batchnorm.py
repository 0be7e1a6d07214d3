"""BatchNorm statistics re-estimated for the decisions a model will make at inference.

Running statistics are averaged over training batches whose decisions were noisy and computed every branch for
every image; after calibration (or any threshold change) they no longer describe what the layers see. As in OFA's
`set_running_statistics` and slimmable networks' BN calibration, they are recomputed on about 2,000 training images
with the deterministic decisions, each skipped block seeing only the images that run it.
"""
import torch
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, data: DataLoader, images: int = 2000) -> int:
    """Recompute every BatchNorm's running mean and variance as the average over up to `images` images.

    Only batches of the first batch's size are used, so that the cumulative average over batches is the average
    over images.

    Returns:
        The number of images used.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    seen = 0
    try:
        with model.masked_path():
            size = None
            for batch, _ in data:
                size = size or len(batch)
                if len(batch) != size or (seen and seen + size > images):
                    break
                model(batch)
                seen += size
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return seen
