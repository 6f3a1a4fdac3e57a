"""Runs an ordered list of passes, lints after each, and names the culprit when one fails."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch.fx as fx

from .base import Declined, PassError


class PassPipelineError(Exception):
    def __init__(self, failed: str, before: list[str], cause: BaseException):
        ran = ", ".join(before) or "none"
        first_line = (str(cause).splitlines() or [type(cause).__name__])[0]
        super().__init__(f"pass {failed} failed ({first_line}); passes run before it: {ran}")
        self.failed, self.before, self.cause = failed, before, cause


@dataclass
class PassRecord:
    name: str
    modified: bool
    counters: dict[str, int]
    declined: list[Declined] = field(default_factory=list)


class PassManager:
    """`PassManager(passes, dump_dir=…, dump=("InsertCacheWritePass",))(gm)` -> list of records.

    After every pass the graph is linted (fx's own checks plus the cache-aliasing rule below) and
    recompiled. `dump` names passes whose graph is written before and after, or "*" for all.
    Any exception a pass raises (its `requires`/`ensures` included) comes out as a
    PassPipelineError naming it. A PassManager may stand in the list of another: its passes run
    in place there, their records join the outer list, and a failure names the path
    ("outer/inner") to the pass that raised.
    """

    def __init__(self, passes: list, dump_dir: str | Path | None = None, dump=(), name: str = "PassManager"):
        self.passes = passes
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.dump = set(dump)
        self.name = name

    def __call__(self, gm: fx.GraphModule) -> list[PassRecord]:
        records: list[PassRecord] = []
        for i, p in enumerate(self.passes):
            if isinstance(p, PassManager):
                try:
                    records.extend(p(gm))
                except PassPipelineError as e:
                    raise PassPipelineError(f"{p.name}/{e.failed}", [r.name for r in records] + e.before,
                                            e.cause) from e.cause
                continue
            dumping = self.dump_dir is not None and (p.name in self.dump or "*" in self.dump)
            if dumping:
                self._write(gm, f"{i:02d}_{p.name}_before.txt")
            try:
                result = p(gm)
                lint(result.gm)
            except Exception as e:  # whatever went wrong, the user learns which pass it was
                raise PassPipelineError(p.name, [r.name for r in records], e) from e
            gm = result.gm
            gm.recompile()
            if dumping:
                self._write(gm, f"{i:02d}_{p.name}_after.txt")
            records.append(PassRecord(p.name, result.modified, dict(p.counters), list(p.declined)))
        return records

    def _write(self, gm: fx.GraphModule, name: str) -> None:
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        (self.dump_dir / name).write_text(str(gm.graph))


def lint(gm: fx.GraphModule) -> None:
    """fx's structural lint, plus: no node reads a cache slot after a write to that slot.

    A cache read is a get_attr of the live buffer (an alias); once a write (`cache_write` or an
    in-place update such as `cache_scatter`) has mutated the buffer, an earlier read would
    silently see the new value. Passes must order writes after such reads (a read made after the
    write is fine).
    """
    gm.graph.lint()
    from ..ops import is_cache_write

    written: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if is_cache_write(node):
            written[node.args[0].target] = node
        for inp in node.all_input_nodes:
            if inp.op == "get_attr" and inp.target in written and not is_cache_write(node):
                if _precedes(inp, written[inp.target]):
                    raise PassError(
                        f"node {node.name} uses cache read {inp.name} of {inp.target} after "
                        f"{written[inp.target].name} overwrote it"
                    )


def _precedes(a: fx.Node, b: fx.Node) -> bool:
    n = a
    while n is not None and n.op != "root":
        if n is b:
            return True
        n = n.next
    return False
