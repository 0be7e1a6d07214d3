"""The L-Net and C-Net gates, and the residual wrapper that skips a branch for real.

Both gates are the same small network on a pooled feature: Linear -> LayerNorm -> ReLU -> Linear, giving per unit a
keep logit and a scale. An L-Net has one unit (its block); a C-Net has one unit per channel of its group. The pooling
is a node of its own (`GatePool`) so that gates reading the same tensor share it. Gates start open with scale 1, so
that a converted model computes exactly what the original computed.
"""
import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

# Initial keep logit: open gates, with a small chance (sigmoid(-3) ~ 5%) that training noise explores a skip.
OPEN_LOGIT = 3.0
# A width-mode C-Net chooses among at most this many widths above the channels it always keeps.
MAX_WIDTHS = 8


def gate_hidden(in_channels: int) -> int:
    """Width of a gate's hidden layer: small next to the layers it controls."""
    return max(8, min(64, in_channels // 4))


class GatePool(nn.Module):
    """Global average pooling of a gate's input: [N, C, H, W] -> [N, C] (or [N, H, W, C] for channels-last)."""

    def __init__(self, axis: int = 1):
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)) if self.axis == 1 else x.mean((1, 2))


class Gate(nn.Module):
    """Predicts, per image, which of `units` to keep and how to scale each kept one.

    Training uses a straight-through Gumbel-sigmoid: hard 0/1 decisions in the forward pass (soft decisions that are
    rounded only at test time lose most of the accuracy), sigmoid gradients in the backward pass. The logistic noise
    is scaled by `noise` and the sigmoid sharpened by `tau`, both annealed by the training schedule so that the
    decisions of late training are the deterministic ones of inference. Evaluation is hard: keep where
    logit > threshold. `threshold` is a buffer so that calibration can move it, and `active` a buffer so that a gate
    that was not trained stays open after save and load.

    Attributes:
        keep_logits: how many keep logits the MLP predicts before the `units` scales: one per unit here, one per
            bucket of channels in a `WidthGate`.
        tau: temperature of the relaxed decision (its gradient); <= 1 works best.
        noise: scale of the logistic noise in training (1: Gumbel-sigmoid; 0: deterministic).
        forced: if set, a 0/1 tensor broadcastable to [batch, units] that replaces the decisions.
        last_keep: the decisions of the last forward pass, [batch, units], differentiable in training.
        last_prob: the keep probabilities sigmoid(logit - threshold) of the last training pass, without noise,
            [batch, units], for the losses that shape the decisions; None in evaluation.
    """

    threshold: torch.Tensor
    active: torch.Tensor

    def __init__(self, in_channels: int, units: int, hidden: int, min_keep: int = 0, keep_logits: int | None = None):
        super().__init__()
        self.units, self.min_keep = units, min_keep
        self.keep_logits = units if keep_logits is None else keep_logits
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.LayerNorm(hidden), nn.ReLU(inplace=True),
                                 out := nn.Linear(hidden, self.keep_logits + units))
        nn.init.zeros_(out.weight)
        with torch.no_grad():
            out.bias[:self.keep_logits] = OPEN_LOGIT
            out.bias[self.keep_logits:] = 0.0
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("active", torch.ones((), dtype=torch.bool))
        self.tau = 1.0
        self.noise = 1.0
        self.forced: torch.Tensor | None = None
        self.last_keep: torch.Tensor | None = None
        self.last_prob: torch.Tensor | None = None

    @property
    def is_active(self) -> bool:
        return bool(self.active)

    @property
    def learning(self) -> bool:
        """True while the gate is active and its parameters are trained."""
        return self.is_active and self.mlp[-1].get_parameter("weight").requires_grad

    def make_static(self) -> None:
        """Make the gate ignore its input: every image gets the same decisions and scales (up to training noise).

        The first layer's weights are zeroed and their gradients dropped, so the gate learns through its biases
        only and stays input-independent after save and load (its state dict holds the zeros): the static baseline
        that a dynamic model must beat, with the same gates, losses and training.
        """
        first = self.mlp[0].get_parameter("weight")
        with torch.no_grad():
            first.zero_()
        first.register_hook(torch.zeros_like)

    @property
    def decisions(self) -> torch.Tensor:
        """The decisions of the last forward pass (`last_keep`), [batch, units].

        Raises:
            RuntimeError: the gate has not run yet.
        """
        if self.last_keep is None:
            raise RuntimeError("the gate has not run yet: no decisions")
        return self.last_keep

    def logits(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep logits [batch, keep_logits] and scales [batch, units], from the pooled gate input."""
        logit, delta = self.mlp(pooled).split([self.keep_logits, self.units], dim=1)
        return logit, 1.0 + delta

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decisions (0/1) and scales, each [batch, units]."""
        n = pooled.shape[0]
        self.last_prob = None
        if not self.is_active:
            keep = pooled.new_ones(n, self.units)
            self.last_keep = keep
            return keep, keep
        logit, scale = self.logits(pooled)
        if self.forced is not None:
            keep = self.forced.to(logit.dtype).expand(n, self.units)
        elif self.training:
            u = torch.rand_like(logit).clamp_(1e-6, 1 - 1e-6)
            soft = torch.sigmoid((logit - self.threshold + self.noise * (torch.log(u) - torch.log1p(-u))) / self.tau)
            keep = self.relaxed(soft, logit)
            self.last_prob = self.probability(logit)
        else:
            keep = self.hard(logit)
        self.last_keep = keep
        return keep, scale

    def hard(self, logit: torch.Tensor) -> torch.Tensor:
        """Evaluation decisions, 0/1 [batch, units], from the keep logits."""
        return self._at_least_min_keep(logit > self.threshold, logit).to(logit.dtype)

    def relaxed(self, soft: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
        """Training decisions [batch, units]: hard 0/1 forward, the gradient of the noisy sigmoids `soft` backward."""
        hard = self._at_least_min_keep(soft > 0.5, logit)
        return hard.to(soft.dtype) + (soft - soft.detach())  # exactly 0/1 forward: (soft - soft) is exactly 0

    def probability(self, logit: torch.Tensor) -> torch.Tensor:
        """Keep probability of each unit without noise, [batch, units]."""
        return torch.sigmoid(logit - self.threshold)

    def _at_least_min_keep(self, keep: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
        """Keep the `min_keep` units with the largest logits whatever the threshold says."""
        if not self.min_keep:
            return keep
        top = logit.topk(self.min_keep, dim=1).indices
        return keep.scatter(1, top, True)


class WidthGate(Gate):
    """A C-Net gate of width mode: keeps a prefix of its group's channels (ordered by importance at conversion).

    It predicts one keep logit per *bucket*, the channels between two consecutive `widths`, and decisions are nested:
    a bucket is kept when it and every narrower bucket are (straight-through in training, so the product of the
    relaxed decisions carries the gradient). Decisions, probabilities and scales are per channel, [batch, units],
    as for a `Gate`, so the masked graph, the FLOPs cost, the budget losses and calibration see no difference.

    Args:
        widths: the channel counts an image may keep, ascending; the first (at least `min_keep`) is always kept,
            the last is every channel.
    """

    bucket_of: torch.Tensor
    steps: torch.Tensor

    def __init__(self, in_channels: int, widths: Sequence[int], hidden: int, min_keep: int = 0):
        super().__init__(in_channels, widths[-1], hidden, min_keep, keep_logits=len(widths) - 1)
        self.widths = list(widths)
        steps = [b - a for a, b in itertools.pairwise(widths)]
        # Channel c belongs to bucket bucket_of[c] - 1 (0: the channels always kept); bucket b has steps[b] channels.
        sizes = torch.tensor([widths[0], *steps])
        self.register_buffer("bucket_of", torch.arange(len(widths)).repeat_interleave(sizes), persistent=False)
        self.register_buffer("steps", torch.tensor(steps, dtype=torch.float32), persistent=False)

    def expand(self, buckets: torch.Tensor) -> torch.Tensor:
        """Per-bucket values [batch, buckets] as per-channel values [batch, units] (1 for the channels always kept)."""
        return torch.cat([buckets.new_ones(buckets.shape[0], 1), buckets], 1).index_select(1, self.bucket_of)

    def hard(self, logit: torch.Tensor) -> torch.Tensor:
        """Evaluation decisions, the prefix of each image's width: arithmetic only, no indexing (the runtime's
        decisions take no gather)."""
        kept = (logit > self.threshold).to(self.steps.dtype).cumprod(1)
        return self.prefixes(self.widths[0] + kept @ self.steps).to(logit.dtype)

    def relaxed(self, soft: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
        return self.expand(((soft > 0.5).to(soft.dtype) + (soft - soft.detach())).cumprod(1))

    def probability(self, logit: torch.Tensor) -> torch.Tensor:
        return self.expand(torch.sigmoid(logit - self.threshold).cumprod(1))

    def prefixes(self, widths: torch.Tensor) -> torch.Tensor:
        """0/1 decisions [batch, units] keeping the first `widths[i]` channels of image i (e.g. to force them)."""
        return (torch.arange(self.units, device=widths.device) < widths[:, None]).to(self.steps.dtype)


def width_choices(channels: int, min_keep: int = 0) -> list[int]:
    """The widths a width-mode C-Net chooses from: at most `MAX_WIDTHS` steps of a multiple of 8 (16 for groups of
    256 channels or more), starting at `min_keep` rounded up to a step; empty when that leaves no choice."""
    unit = 8 if channels < 256 else 16
    step = unit * math.ceil(channels / (MAX_WIDTHS * unit))
    first = min(channels, math.ceil(min_keep / step) * step)
    widths = [*range(first, channels, step), channels]
    return widths if len(widths) > 1 else []


class ChannelGate(nn.Module):
    """C-Net: scales the channels of its group, zeroing the dropped ones, from a decision made on the group input.

    With `widths` (width mode), its gate keeps a prefix of the channels at one of those widths (`WidthGate`).
    """

    def __init__(self, in_channels: int, channels: int, hidden: int, axis: int = 1, min_keep: int = 0,
                 widths: Sequence[int] = ()):
        super().__init__()
        self.axis = axis
        if widths and widths[-1] != channels:
            raise ValueError(f"the widths {list(widths)} of a C-Net must end at its {channels} channels")
        self.gate = WidthGate(in_channels, widths, hidden, min_keep) if widths else \
            Gate(in_channels, channels, hidden, min_keep)

    def forward(self, pooled: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        keep, scale = self.gate(pooled)
        mult = keep * scale
        shape = (mult.shape[0], -1, 1, 1) if self.axis == 1 else (mult.shape[0], 1, 1, -1)
        return x * mult.reshape(shape)


class GatedResidual(nn.Module):
    """L-Net around an outlined residual branch: returns ``shortcut + keep * scale * branch(x, *extra)``.

    While its gate learns, every image runs the branch, multiplied by its 0/1 decision, so that the decision gets a
    gradient. Otherwise (evaluation, or a frozen gate), images whose block is skipped never enter the branch: it runs
    on the images that keep it (gathered and scattered back), and not at all if none does. The branch is set by the
    unit that owns this gate (it runs the unit's own layers) and is not a submodule, so the layers keep their timm
    names.
    """

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.gate = Gate(channels, 1, hidden)
        self.branch: Callable[..., torch.Tensor] | None = None

    def set_branch(self, branch: Callable[..., torch.Tensor]) -> None:
        """Run `branch` as the residual branch (kept out of the submodules: its layers belong to the unit)."""
        self.__dict__["branch"] = branch

    def __getstate__(self):
        state = super().__getstate__()
        state["branch"] = None  # a copy runs the copied unit's layers: the unit sets it again
        return state

    def _run_branch(self, x: torch.Tensor, *extra) -> torch.Tensor:
        if self.branch is None:
            raise RuntimeError("the residual branch is not set; the DynamicUnit that owns this gate sets it")
        return self.branch(x, *extra)

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor, pooled: torch.Tensor, *extra) -> torch.Tensor:
        keep, scale = self.gate(pooled)
        idx = keep[:, 0].nonzero()[:, 0]
        # In training, one image alone cannot give BatchNorm statistics (a 1x1 map): it runs with the others.
        if self.training and torch.is_grad_enabled() and (self.gate.learning or idx.numel() == 1):
            return shortcut + (keep * scale).reshape(-1, 1, 1, 1) * self._run_branch(x, *extra)
        if idx.numel() == x.shape[0]:
            return shortcut + scale.reshape(-1, 1, 1, 1) * self._run_branch(x, *extra)
        out = shortcut.clone()  # a fresh tensor, as the add it replaces: the unit may write into it in place
        if idx.numel():
            out[idx] += scale[idx].reshape(-1, 1, 1, 1) * self._branch_on(x, extra, idx)
        self._scatter_inner_decisions(idx, x.shape[0])
        return out

    def _inner_gates(self):
        return [m for m in self.branch.modules() if isinstance(m, Gate)] if isinstance(self.branch, nn.Module) else []

    def _branch_on(self, x: torch.Tensor, extra, idx: torch.Tensor) -> torch.Tensor:
        """The branch on the images `idx` of x; per-image forced decisions of its channel gates follow the images."""
        inner = [m for m in self._inner_gates() if m.forced is not None and m.forced.dim() == 2
                 and m.forced.shape[0] == x.shape[0] > 1]
        saved = [m.forced for m in inner]
        for m in inner:
            m.forced = m.forced[idx]
        try:
            return self._run_branch(self._images(x, idx), *(self._images(e, idx) for e in extra))
        finally:
            for m, forced in zip(inner, saved):
                m.forced = forced

    @staticmethod
    def _images(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The images `idx` of a batch tensor (the runtime picks them faster)."""
        return t[idx]

    def _scatter_inner_decisions(self, idx: torch.Tensor, batch: int) -> None:
        """Give the branch's channel gates full-batch decisions (zero where the branch was skipped)."""
        for m in self._inner_gates():
            full = torch.zeros(batch, m.units, device=idx.device)
            if idx.numel() and m.last_keep is not None:
                full[idx] = m.last_keep
            m.last_keep = full
