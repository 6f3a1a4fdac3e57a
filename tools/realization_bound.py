"""The best realization a method can reach on this machine, whatever the implementation.

Realization = wall-clock speedup / FLOPs speedup. The papers' FLOPs count a cached step's work in
multiply-adds, but on a CPU (and at small token counts on any device) the MLP on k fresh tokens is
not proportional to its FLOPs: a GEMM with 2k rows runs far below the machine's full-step GEMM
speed. This tool times exactly that work on the model's own layers and adds nothing else — no
scoring, gathers, scatters, gates, residual adds, cache writes, forecasts or K-means:

    full step          the uncached step, measured (median of --repeats forward calls), with the
                       adaLN modulation precomputed for the run as graphcache does by default
                       (HoistConditioningPass): the step reads no adaLN weights
    partial block      the MLP on the step's fresh tokens (ToCa, DuCa, ClusCa), in the faster of
                       the two layouts graphcache knows (x·Wᵀ, W·xᵀ)
    reuse / forecast   nothing (FORA, TaylorSeer): their gates are precomputed too
    skip               nothing (DuCa's aggressive steps)

so the realization it prints is an upper bound for any implementation on this machine that
precomputes the modulation. (Without that precomputation each cached block would also pay for its
adaLN chunks: memory-bound GEMVs that read the block's modulation weights.)

    python tools/realization_bound.py                                  # DiT-XL/2 size, every method
    python tools/realization_bound.py --methods toca,clusca --json bound.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import graphcache
from graphcache import ir
from graphcache.flops import flops_json
from graphcache.io import atomic_write
from graphcache.methods import METHODS, get_method
from graphcache.models.builtin import resolve_model
from graphcache.passes.few_token_linears import linear_token_columns

def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _mlp_token_columns(mlp, x):
    hidden = mlp.act(linear_token_columns(x, mlp.fc1.weight, mlp.fc1.bias))
    return linear_token_columns(hidden, mlp.fc2.weight, mlp.fc2.bias)


class WorkTimer:
    """Times a block's unavoidable work at batch `batch` (CFG rows), cycling through every block's
    own weights, so they are as cold in the caches as in a real step (one block's weights alone
    would stay in a CPU's L3 and time too fast)."""

    def __init__(self, model, batch: int, repeats: int):
        self.blocks, self.repeats, self.batch = list(model.blocks), repeats, batch
        self.hidden = self.blocks[0].adaLN_modulation[1].in_features
        self._mlp = {0: 0.0}

    def _per_block(self, fn) -> float:
        return median_seconds(fn, self.repeats) / len(self.blocks)

    def mlp_seconds(self, tokens: int) -> float:
        """The faster of the two layouts graphcache knows for a few token rows: F.linear's x·Wᵀ and
        W·xᵀ (TransposeFewTokenLinearsPass, what eager runs use)."""
        if tokens not in self._mlp:
            x = torch.randn(self.batch, tokens, self.hidden)
            self._mlp[tokens] = min(self._per_block(lambda: [b.mlp(x) for b in self.blocks]),
                                    self._per_block(lambda: [_mlp_token_columns(b.mlp, x) for b in self.blocks]))
        return self._mlp[tokens]

    def block_seconds(self, kind: str, tokens: int) -> float:
        return self.mlp_seconds(tokens) if kind == "partial" else 0.0


def bound(method: str, model, structure, full_step: float, timer: WorkTimer, steps: int) -> dict:
    schedule = get_method(method).schedule(steps, structure.depth, {}, structure.num_tokens)
    total = 0.0
    for plan in schedule.steps:
        tokens = plan.tokens or [0] * len(plan.kinds)
        if all(kind == "full" for kind in plan.kinds):
            total += full_step
            continue
        for kind, k in zip(plan.kinds, tokens):
            total += full_step / len(plan.kinds) if kind == "full" else timer.block_seconds(kind, k)
    flops_speedup = flops_json(schedule, model)["speedup"]
    speedup = steps * full_step / total
    return {"method": method, "seconds": total, "speedup": speedup, "flops_speedup": flops_speedup,
            "realization_bound": speedup / flops_speedup}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:dit-xl2-random", help="a DiT (builtin:NAME or checkpoint)")
    p.add_argument("--methods", default=",".join(m for m in METHODS if m != "none"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=2, help="rows per call (2 = one image with CFG)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = resolve_model(args.model).eval()
    uncached = graphcache.optimize(model, "none", args.steps)
    structure = ir.structure_of(uncached.captured)
    size = model.input_size
    x = torch.randn(args.batch, model.in_channels, size, size)
    t, y = torch.full((args.batch,), 500), torch.zeros(args.batch, dtype=torch.long)
    uncached.start_sampling(args.steps)
    uncached.announce_inputs([(t, y)] * args.steps)  # every step's modulation precomputed, as in a run
    with torch.no_grad():
        full_step = median_seconds(lambda: uncached(x, t, y), args.repeats)
        timer = WorkTimer(model, args.batch, args.repeats)
        results = [bound(m, model, structure, full_step, timer, args.steps) for m in args.methods.split(",")]
    print(f"{args.model}: uncached step {full_step * 1e3:.0f} ms (batch {args.batch}, "
          f"{torch.get_num_threads()} threads)")
    print("| method | bound s/run | speedup | FLOPs speedup | realization ≤ |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['seconds']:.1f} | {r['speedup']:.2f}× | {r['flops_speedup']:.2f}× | "
              f"{r['realization_bound']:.2f} |")
    if args.json:
        report = {"model": args.model, "full_step_seconds": full_step, "results": results}
        atomic_write(Path(args.json), lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
