"""The GatePlan: plain, JSON-serialisable data naming every gate, where it sits and the FLOPs it controls.

Each gate lives in a *unit*, a module of the timm model (usually a residual block) that is rewritten on its own; a
plan names the unit by its module path and the nodes by their names in that unit's torch.fx trace. Tracing the same
architecture again gives the same names, which is what lets a saved model be rebuilt by replaying its plan on a
freshly built base model.
"""
from dataclasses import asdict, dataclass, field

from ..errors import RunError

PLAN_VERSION = 2
GATE_KINDS = ("both", "layer", "channel")
# How a C-Net keeps channels: any subset of them ("channel", the paper's), or a prefix of channels ordered by
# importance at conversion, at one of a few widths ("width": no gathers at inference).
CHANNEL_MODES = ("channel", "width")


@dataclass
class BlockSite:
    """A residual block `shortcut + F(x)` whose branch F gets an L-Net.

    Attributes:
        name: the module path that owns the residual add (e.g. ``layer1.0``).
        unit: the module rewritten to hold the gate (the block itself, or a module around it).
        add: node of the residual add.
        fork: node of the block input x, the branch's only input; the L-Net reads its pooled features.
        branch_out: node of F(x), the add's operand computed by the branch.
        shortcut: node of the add's other operand.
        branch_nodes: every node of F, outlined so that a skipped block is not computed.
        channels: channels of x, the L-Net's input.
        hidden: width of the L-Net.
        flops: FLOPs of F for one image at the plan's input size.
        gate_flops: FLOPs of the L-Net's MLP.
        pool_flops: FLOPs of average-pooling x (paid once for all gates that read x).
    """
    name: str
    unit: str
    add: str
    fork: str
    branch_out: str
    shortcut: str
    branch_nodes: list[str]
    channels: int
    hidden: int
    flops: int
    gate_flops: int
    pool_flops: int

    @property
    def pool(self) -> str:
        """The pooled tensor the gate reads, as `unit:node`; gates that read the same tensor share its pooling."""
        return f"{self.unit}:{self.fork}"


@dataclass
class ChannelGroup:
    """Output channels of one convolution (or channels-last linear) that a C-Net keeps or drops per image.

    Attributes:
        name: the producing layer's module path.
        unit: the module rewritten to hold the gate.
        producer: node of the producing convolution / linear.
        gate_input: node the C-Net reads pooled (the producer's input), so the decision precedes the computation.
        gate_after: node after which the gate scales the channels (end of the group's per-channel chain).
        members: nodes whose cost scales with the kept fraction (producer, norms, depthwise convs).
        sinks: convolutions / linears that read the group's channels as input; for a group that ends where its
            channels leave the unit for the model's head, only those in the unit (docs/architecture.md, "Groups that
            run into the head").
        exits: residual adds the group's channels are added into (the group ends a residual branch): a dropped channel
            adds nothing there, and the shortcut's channel passes on unchanged.
        channels: number of channels in the group.
        in_channels: channels of `gate_input`.
        axis: channel axis of the gated tensor (1 for NCHW convolutions, -1 for channels-last linears).
        hidden: width of the C-Net.
        block: the gated residual block whose branch contains the group, if any.
        flops: FLOPs that scale with this group's kept fraction.
        gate_flops: FLOPs of the C-Net's MLP.
        pool_flops: FLOPs of average-pooling the gate input (paid once for all gates that read it).
        min_keep: channels every image keeps. A group outside every residual branch has no shortcut around it:
            losing all of its channels would cut the network, so it keeps a share (see `MIN_KEEP_SHARE`).
        widths: in width mode, the channel counts an image may keep, ascending (the first is always kept, the last
            is every channel); the group's channels were ordered by importance at conversion. Empty: any subset.
    """
    name: str
    unit: str
    producer: str
    gate_input: str
    gate_after: str
    members: list[str]
    sinks: list[str]
    channels: int
    in_channels: int
    axis: int
    hidden: int
    block: str | None
    flops: int
    gate_flops: int
    pool_flops: int
    min_keep: int = 0
    widths: list[int] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)

    @property
    def always_kept(self) -> int:
        """Channels every image keeps: `min_keep`, rounded up to the first width in width mode."""
        return self.widths[0] if self.widths else self.min_keep

    @property
    def pool(self) -> str:
        """The pooled tensor the gate reads, as `unit:node`; gates that read the same tensor share its pooling."""
        return f"{self.unit}:{self.gate_input}"


@dataclass
class CostItem:
    """FLOPs of one node of the whole-model graph, and the gate decisions that scale them.

    The node's per-image cost is ``flops * keep(block) * prod(kept fraction of g for g in groups)``.
    """
    node: str
    flops: int
    block: str | None = None
    groups: list[str] = field(default_factory=list)


@dataclass
class Skipped:
    """Something that looked gateable but is not gated, with the reason."""
    kind: str
    where: str
    reason: str


@dataclass
class GatePlan:
    """Which gates go where in one architecture, and the FLOPs accounting that goes with them.

    `none_args` names, per unit, the forward arguments the model passes as None (traced as constants).
    `channel_mode` is "channel" or "width" (see `CHANNEL_MODES`); in width mode a group whose channels could not be
    reordered keeps per-channel decisions (no `widths`) and `skipped` says why.
    """
    architecture: str
    gates: str
    input_size: list[int]
    total_flops: int
    blocks: list[BlockSite] = field(default_factory=list)
    groups: list[ChannelGroup] = field(default_factory=list)
    costs: list[CostItem] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    none_args: dict[str, list[str]] = field(default_factory=dict)
    channel_mode: str = "channel"
    version: int = PLAN_VERSION

    @property
    def gate_flops(self) -> int:
        """FLOPs of all gates together for one image: their MLPs and the pooling of each tensor they read."""
        sites: list[BlockSite | ChannelGroup] = [*self.blocks, *self.groups]
        pools = {s.pool: s.pool_flops for s in sites}
        return sum(b.gate_flops for b in self.blocks) + sum(g.gate_flops for g in self.groups) + sum(pools.values())

    @property
    def units(self) -> list[str]:
        """The modules that hold gates."""
        return list(dict.fromkeys([b.unit for b in self.blocks] + [g.unit for g in self.groups]))

    @property
    def controlled_flops(self) -> int:
        """FLOPs of the original model that at least one gate can remove."""
        return sum(c.flops for c in self.costs if c.block or c.groups)

    def largest_ungated(self, n: int = 3) -> str:
        """The `n` costliest layers that no gate can remove, with their shares of the original FLOPs ("conv1 2.3%,
        ..."): with the gates' own cost they make the smallest reachable fraction. Empty if every node is gated."""
        ungated = sorted((c for c in self.costs if not (c.block or c.groups)), key=lambda c: -c.flops)
        # A layer's graph node is named after its module path with "_" for "."; name it as `skipped` does.
        modules = {s.where.replace(".", "_"): s.where for s in self.skipped}
        return ", ".join(f"{modules.get(c.node, c.node)} {100 * c.flops / self.total_flops:.1f}%" for c in ungated[:n])

    def summary(self) -> dict[str, float]:
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
            if version < PLAN_VERSION:
                raise RunError(f"the gate plan is version {version}, from an older dynamize that rewrote the whole "
                               "model; re-run `dynamize convert` (and fine-tune again) with this version")
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
        if plan.channel_mode not in CHANNEL_MODES:
            raise RunError(f"the gate plan names an unknown channel mode {plan.channel_mode!r}; expected one of "
                           f"{CHANNEL_MODES}")
        return plan
