"""The GatePlan: plain, JSON-serialisable data naming every gate, where it sits and the FLOPs it controls.

A plan refers to nodes of the model's torch.fx graph by name. Tracing the same architecture again gives the same
names, which is what lets a saved model be rebuilt by replaying its plan on a freshly built base model.
"""
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from .errors import RunError

PLAN_VERSION = 1
GATE_KINDS = ("both", "layer", "channel")


@dataclass
class BlockSite:
    """A residual block `shortcut + F(x)` whose branch F gets an L-Net.

    Attributes:
        name: the module path that owns the residual add (e.g. ``layer1.0``).
        add: graph node of the residual add.
        fork: node of the block input x, the branch's only input.
        branch_out: node of F(x), the add's operand computed by the branch.
        shortcut: node of the add's other operand.
        branch_nodes: every node of F, outlined into its own module so that a skipped block is not computed.
        channels: channels of x, the L-Net's input.
        hidden: width of the L-Net.
        flops: FLOPs of F for one image at the plan's input size.
        gate_flops: FLOPs of the L-Net itself.
    """
    name: str
    add: str
    fork: str
    branch_out: str
    shortcut: str
    branch_nodes: List[str]
    channels: int
    hidden: int
    flops: int
    gate_flops: int


@dataclass
class ChannelGroup:
    """Output channels of one convolution (or channels-last linear) that a C-Net keeps or drops per image.

    Attributes:
        name: the producing layer's module path.
        producer: node of the producing convolution / linear.
        gate_input: node the C-Net reads (the producer's input), so the decision precedes the computation.
        gate_after: node after which the gate scales the channels (end of the group's per-channel chain).
        members: nodes whose cost scales with the kept fraction (producer, norms, depthwise convs).
        sinks: convolutions / linears that read the group's channels as input.
        channels: number of channels in the group.
        in_channels: channels of `gate_input`.
        axis: channel axis of the gated tensor (1 for NCHW convolutions, -1 for channels-last linears).
        hidden: width of the C-Net.
        block: the residual block whose branch contains the group, if any.
        flops: FLOPs that scale with this group's kept fraction.
        gate_flops: FLOPs of the C-Net itself.
    """
    name: str
    producer: str
    gate_input: str
    gate_after: str
    members: List[str]
    sinks: List[str]
    channels: int
    in_channels: int
    axis: int
    hidden: int
    block: Optional[str]
    flops: int
    gate_flops: int


@dataclass
class CostItem:
    """FLOPs of one graph node, and the gate decisions that scale them.

    The node's per-image cost is ``flops * keep(block) * prod(kept fraction of g for g in groups)``.
    """
    node: str
    flops: int
    block: Optional[str] = None
    groups: List[str] = field(default_factory=list)


@dataclass
class Skipped:
    """Something that looked gateable but is not gated, with the reason."""
    kind: str
    where: str
    reason: str


@dataclass
class GatePlan:
    """Which gates go where in one architecture, and the FLOPs accounting that goes with them."""
    architecture: str
    gates: str
    input_size: List[int]
    total_flops: int
    blocks: List[BlockSite] = field(default_factory=list)
    groups: List[ChannelGroup] = field(default_factory=list)
    costs: List[CostItem] = field(default_factory=list)
    skipped: List[Skipped] = field(default_factory=list)
    version: int = PLAN_VERSION

    @property
    def gate_flops(self) -> int:
        """FLOPs of all gates together, for one image."""
        return sum(b.gate_flops for b in self.blocks) + sum(g.gate_flops for g in self.groups)

    @property
    def controlled_flops(self) -> int:
        """FLOPs of the original model that at least one gate can remove."""
        return sum(c.flops for c in self.costs if c.block or c.groups)

    def summary(self) -> Dict[str, float]:
        """Headline numbers: counts, and shares of the original model's FLOPs."""
        return {
            "blocks": len(self.blocks),
            "groups": len(self.groups),
            "total_gflops": self.total_flops / 1e9,
            "controlled_share": self.controlled_flops / self.total_flops,
            "gate_overhead": self.gate_flops / self.total_flops,
        }

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GatePlan":
        """Rebuild a plan from its JSON form.

        Raises:
            RunError: the plan is from a newer dynamize or is malformed.
        """
        try:
            version = int(d.get("version", -1))
            if version > PLAN_VERSION:
                raise RunError(f"the gate plan is version {version}, newer than this dynamize understands "
                               f"({PLAN_VERSION}); upgrade dynamize")
            if version < 1:
                raise RunError("the gate plan has no valid version; re-run `dynamize convert`")
            d = dict(d)
            d["blocks"] = [BlockSite(**b) for b in d.get("blocks", [])]
            d["groups"] = [ChannelGroup(**g) for g in d.get("groups", [])]
            d["costs"] = [CostItem(**c) for c in d.get("costs", [])]
            d["skipped"] = [Skipped(**s) for s in d.get("skipped", [])]
            plan = cls(**d)
        except RunError:
            raise
        except (TypeError, ValueError, AttributeError) as e:
            raise RunError(f"the gate plan in config.json is malformed ({e}); re-run `dynamize convert`") from None
        if plan.gates not in GATE_KINDS:
            raise RunError(f"the gate plan names unknown gates {plan.gates!r}; expected one of {GATE_KINDS}")
        return plan
