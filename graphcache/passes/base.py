"""Pass infrastructure: a pass rewrites a GraphModule in place and says what it did.

Modelled on onnx_ir's pass infra and Inductor's counters: `call(gm)` returns
`PassResult(gm, modified)`, `requires`/`ensures` check pre- and post-conditions, and every rewrite
bumps a named counter that tests assert exactly. A pass that finds a match it must not rewrite
records why in `declined` instead of failing silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch.fx as fx

from .. import ir


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool


class PassError(Exception):
    """A pass's pre- or post-condition does not hold."""


@dataclass
class Declined:
    target: str  # what the pass looked at (a branch, a node)
    reason: str


class Pass:
    """Base class. Subclasses implement `call`; counters and declines are reset on every run."""

    def __init__(self):
        self.counters: Counter[str] = Counter()
        self.declined: list[Declined] = []

    @property
    def name(self) -> str:
        return type(self).__name__

    def requires(self, gm: fx.GraphModule) -> None:
        """Raise PassError if the pass cannot run on this graph."""

    def ensures(self, gm: fx.GraphModule) -> None:
        """Raise PassError if the pass left the graph in a state it promises not to."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def count(self, key: str, where: ir.Branch | str, n: int = 1) -> None:
        """Add `n` to the counter `key`, and to `key.<stream>` for a branch (or a stream name) of a
        text or joint stream, so that a two-stream model's counts say which stream each rewrite
        went to."""
        stream = where if isinstance(where, str) else where.stream
        self.counters[key] += n
        if stream != ir.IMAGE:
            self.counters[f"{key}.{stream}"] += n

    def decline(self, target: str, reason: str) -> None:
        self.declined.append(Declined(target, reason))

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.counters = Counter()
        self.declined = []
        self.requires(gm)
        result = self.call(gm)
        self.ensures(result.gm)
        return result

    def __repr__(self) -> str:
        return self.name


class BranchPass(Pass):
    """A pass over the branches of some blocks: `blocks` are indices (None: all), `kinds` branch
    kinds (None: all), e.g. (ir.ATTENTION,)."""

    def __init__(self, blocks=None, kinds=None):
        super().__init__()
        self.blocks, self.kinds = blocks, kinds

    def branches(self, gm: fx.GraphModule) -> list[tuple[ir.Branch, fx.Node | None]]:
        """(branch, its ungated output node, None where the graph no longer has it), selected."""
        nodes = ir.nodes_by_name(gm.graph)
        return [(br, nodes.get(br.branch_out)) for br in ir.structure_of(gm).select(self.blocks, self.kinds)]

    def check_replaced(self, gm: fx.GraphModule, replacement: str) -> None:
        """PassError if a selected branch's output is still read (for passes that replace it)."""
        for br, out in self.branches(gm):
            if out is not None and out.users:
                raise PassError(f"branch {br.name} output {out.name} is still used after {replacement}")
