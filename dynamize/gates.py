"""The L-Net and C-Net gates, and the residual wrapper that skips a branch for real.

Both gates are the same small network: global average pool -> Linear -> LayerNorm -> ReLU -> Linear, giving per
unit a keep logit and a scale. An L-Net has one unit (its block); a C-Net has one unit per channel of its group.
Gates start open with scale 1 so that a converted model computes exactly what the original computed.
"""
from typing import Optional, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Initial keep logit: open gates, with a small chance (sigmoid(-3) ~ 5%) that training noise explores a skip.
_OPEN_LOGIT = 3.0


def gate_hidden(in_channels: int) -> int:
    """Width of a gate's hidden layer: small next to the layers it controls."""
    return max(8, min(64, in_channels // 4))


def gate_flops(in_channels: int, units: int, hidden: int) -> int:
    """FLOPs of one gate for one image, counted the same way as the model's own layers."""
    gate = Gate(in_channels, units, hidden)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        gate.mlp(torch.zeros(1, in_channels))
    return counter.get_total_flops()


class Gate(nn.Module):
    """Predicts, per image, which of `units` to keep and how to scale each kept one.

    Training uses a straight-through Gumbel-sigmoid: hard 0/1 decisions in the forward pass (soft decisions that are
    rounded only at test time lose most of the accuracy), sigmoid gradients in the backward pass. Evaluation is hard
    and deterministic: keep where logit > threshold. The threshold is a buffer so that calibration can move it.

    Attributes:
        tau: Gumbel-sigmoid temperature (<= 1 works best).
        always_open: keep everything at scale 1; used to train only the other kind of gate.
        forced: if set, a 0/1 tensor broadcastable to [batch, units] that replaces the decisions.
        last_keep: the decisions of the last forward pass, [batch, units], differentiable in training.
    """

    def __init__(self, in_channels: int, units: int, hidden: int, axis: int = 1):
        super().__init__()
        self.units, self.axis = units, axis
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.LayerNorm(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, 2 * units))
        nn.init.zeros_(self.mlp[-1].weight)
        with torch.no_grad():
            self.mlp[-1].bias[:units] = _OPEN_LOGIT
            self.mlp[-1].bias[units:] = 0.0
        self.register_buffer("threshold", torch.zeros(()))
        self.tau = 1.0
        self.always_open = False
        self.forced: Optional[torch.Tensor] = None
        self.last_keep: Optional[torch.Tensor] = None

    def logits(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keep logits and scales, each [batch, units], from the gate's input feature map."""
        pooled = x.mean((2, 3)) if self.axis == 1 else x.mean((1, 2))
        logit, delta = self.mlp(pooled).split(self.units, dim=1)
        return logit, 1.0 + delta

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decisions (0/1) and scales, each [batch, units]."""
        n = x.shape[0]
        if self.always_open:
            keep = x.new_ones(n, self.units)
            self.last_keep = keep
            return keep, keep
        logit, scale = self.logits(x)
        if self.forced is not None:
            keep = self.forced.to(logit.dtype).expand(n, self.units)
        elif self.training:
            u = torch.rand_like(logit).clamp_(1e-6, 1 - 1e-6)
            soft = torch.sigmoid((logit - self.threshold + torch.log(u) - torch.log1p(-u)) / self.tau)
            keep = (soft > 0.5).to(soft.dtype) + soft - soft.detach()
        else:
            keep = (logit > self.threshold).to(logit.dtype)
        self.last_keep = keep
        return keep, scale


class ChannelGate(nn.Module):
    """C-Net: scales the channels of its group, zeroing the dropped ones, from a decision made on the group input."""

    def __init__(self, in_channels: int, channels: int, hidden: int, axis: int = 1):
        super().__init__()
        self.gate = Gate(in_channels, channels, hidden, axis)

    def forward(self, gate_input: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        keep, scale = self.gate(gate_input)
        mult = keep * scale
        shape = (mult.shape[0], -1, 1, 1) if self.gate.axis == 1 else (mult.shape[0], 1, 1, -1)
        return x * mult.reshape(shape)


class GatedResidual(nn.Module):
    """L-Net around an outlined residual branch: returns ``shortcut + keep * scale * branch(x)``.

    In evaluation, images whose block is skipped never enter the branch: the branch runs on the images that keep it
    (gathered and scattered back), and not at all if none does.
    """

    def __init__(self, branch: nn.Module, channels: int, hidden: int):
        super().__init__()
        self.branch = branch
        self.gate = Gate(channels, 1, hidden)

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        keep, scale = self.gate(x)
        if self.training:
            return shortcut + (keep * scale).reshape(-1, 1, 1, 1) * self.branch(x)
        idx = keep[:, 0].nonzero()[:, 0]
        if idx.numel() == x.shape[0]:
            return shortcut + scale.reshape(-1, 1, 1, 1) * self.branch(x)
        if idx.numel():
            out = shortcut.clone()
            out[idx] += scale[idx].reshape(-1, 1, 1, 1) * self._branch_on(x, idx)
        else:
            out = shortcut
        self._scatter_inner_decisions(idx, x.shape[0])
        return out

    def _branch_on(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The branch on the images `idx` of x; per-image forced decisions of its channel gates follow the images."""
        inner = [m for m in self.branch.modules() if isinstance(m, Gate) and m.forced is not None
                 and m.forced.dim() == 2 and m.forced.shape[0] == x.shape[0] > 1]
        saved = [m.forced for m in inner]
        for m in inner:
            m.forced = m.forced[idx]
        try:
            return self.branch(x[idx])
        finally:
            for m, forced in zip(inner, saved):
                m.forced = forced

    def _scatter_inner_decisions(self, idx: torch.Tensor, batch: int) -> None:
        """Give the branch's channel gates full-batch decisions (zero where the branch was skipped)."""
        for m in self.branch.modules():
            if isinstance(m, Gate):
                full = torch.zeros(batch, m.units, device=idx.device)
                if idx.numel() and m.last_keep is not None:
                    full[idx] = m.last_keep
                m.last_keep = full
