"""graphcache against the literal plain-PyTorch references of the token-wise methods, in one process.

The references the tests check graphcache against (tests/methods/toca_reference.py: ToCa and DuCa;
tests/methods/clusca_reference.py: ClusCa and TaylorSeer) are written independently of graphcache,
from the behaviour of the official DiT code (Shenyi-Z/ToCa `DiT-ToCa/`, Shenyi-Z/DuCa `DuCa-DiT/`,
Shenyi-Z/Cache4Diffusion `dit/clusca-dit/`) and in its shape: a Python loop over the blocks with cache dicts, the whole adaLN
modulation in every block, the (B, N, N) attention map kept per layer, torch.gather / scatter_ /
index assignment, K-means and Taylor forecasts evaluated factor by factor. Given the same model,
seed, schedule and options, a reference produces what graphcache produces: the tool checks it
(every step's model output and the final latents within 1e-5 of their scale) and stops with
status 1 if not. The check runs graphcache once with `hoist_conditioning=False`, the plain
model's arithmetic: the timed runs precompute the modulation for the run as graphcache does by
default, which rounds differently (on DiT-XL/2 enough to flip a near-tied ToCa token choice, so
the outputs can drift past 1e-5 while doing the same work). It then times both in one process, the uncached model too, alternating which of
the pair runs first on each repeat (a shared machine drifts by several percent within an hour;
ratios from one run are what to quote):

    seconds per run     median over --repeats runs, build time (capture, passes) excluded
    reference / graphcache
                        how much faster graphcache runs the same method, draw for draw: from the
                        medians, and from the step floors (each step's fastest time over the
                        repeats, added up: disturbances only add time, so this is the steadier one)
    realization         wall-clock speedup over the uncached model / FLOPs speedup, for each side

    python tools/versus_reference.py                      # DiT-XL/2 size, DDIM-50, cfg 1.5 (long on a CPU)
    python tools/versus_reference.py --methods toca,clusca --repeats 2 --json versus.json
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
from graphcache.bench import time_sampling
from graphcache.flops import flops_json
from graphcache.io import atomic_write
from graphcache.models.builtin import resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "methods"))
from clusca_reference import ClusCaReference  # noqa: E402
from toca_reference import ReferenceToCa, max_rel, reference_kwargs  # noqa: E402

TOLERANCE = 1e-5  # max |graphcache - reference| / max |reference|, per step and on the samples, as in the tests


def difference(got: list, want: list) -> float:
    """The largest relative difference of every step's model output and of the final samples (the
    outputs are the sharper test: a random model's samples are dominated by the sampler's drift)."""
    return max(max_rel(a, b) for a, b in zip(got, want, strict=True))


def reference_for(method: str, dit, num_steps: int, options: dict):
    """The reference of `method` with graphcache's resolved `options`."""
    if method in ("toca", "duca"):
        return ReferenceToCa(dit, num_steps, **reference_kwargs(options, duca=method == "duca"))
    if method == "clusca":
        return ClusCaReference(dit, options["interval"], options["clusters"], options["order"],
                               options["propagation"], options["tokens_per_cluster"])
    return ClusCaReference(dit, options["interval"], clusters=0, order=options["order"])  # taylorseer


REFERENCES = ("toca", "duca", "clusca", "taylorseer")


class StepClock:
    """Wraps a model for `graphcache.sample` and records the seconds and the output of each call."""

    def __init__(self, model):
        self.model, self.steps, self.outputs = model, [], []

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def start_sampling(self, num_steps: int) -> None:
        self.steps, self.outputs = [], []
        start = getattr(self.model, "start_sampling", None)
        if start is not None:
            start(num_steps)

    def __call__(self, *args):
        start = time.perf_counter()
        out = self.model(*args)
        self.steps.append(time.perf_counter() - start)
        self.outputs.append(out.clone())
        return out


def summary(runs: list[dict]) -> tuple[float, float]:
    """(median seconds per run, step floor): the floor adds up each step's fastest time over the
    runs. A shared machine's disturbances only ever add time, and they hit different steps on
    different runs, so the floor compares two implementations more steadily than whole runs do."""
    floor = sum(min(times) for times in zip(*(run["steps"] for run in runs)))
    return statistics.median(run["seconds"] for run in runs), floor


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:dit-xl2-random", help="a DiT (builtin:NAME or checkpoint)")
    p.add_argument("--methods", default=",".join(REFERENCES), help=f"some of {', '.join(REFERENCES)}")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each side (median)")
    p.add_argument("--warmup", type=int, default=0, help="untimed runs of each side first (first-call costs)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in REFERENCES]
    if unknown:
        p.error(f"no reference for {unknown[0]!r}; the references: {', '.join(REFERENCES)}")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be at least 1 and --warmup at least 0")

    model = resolve_model(args.model).eval()
    labels = [0]  # one image, as `graphcache bench --batch 1`

    def timed(runner, warmup=0) -> dict:
        """One timed run: {"seconds": whole run, "steps": seconds of each model call, "outputs": the
        model outputs of each call and the samples last}."""
        clock = StepClock(runner)
        result = time_sampling(clock, labels=labels, num_steps=args.steps, sampler=args.sampler,
                               cfg_scale=args.cfg_scale, repeats=1, warmup=warmup)
        return {"seconds": result["seconds"], "steps": clock.steps, "outputs": [*clock.outputs, result["output"]]}

    sides = ("graphcache", "reference")
    runs = {"none": []}
    pairs = {}
    for m in methods:
        compiled = graphcache.optimize(model, m, args.steps)
        pairs[m] = {"graphcache": compiled,
                    "reference": reference_for(m, model, args.steps, compiled.schedule.options),
                    # the check's graphcache: the same passes with the plain model's arithmetic
                    "exact": graphcache.optimize(model, m, args.steps, hoist_conditioning=False)}
        runs.update({(m, side): [] for side in sides})
    uncached = graphcache.optimize(model, "none", args.steps)
    exact_outputs = {}

    def disagreement(m: str) -> float:  # of the exact run and the latest reference run
        return difference(exact_outputs[m], runs[m, "reference"][-1]["outputs"])

    with torch.no_grad():
        for r in range(args.repeats):
            warmup = args.warmup if r == 0 else 0
            runs["none"].append(timed(uncached, warmup))
            say(f"repeat {r + 1}/{args.repeats}: none {runs['none'][-1]['seconds']:.3g} s")
            for m in methods:
                for side in sides if r % 2 == 0 else sides[::-1]:
                    result = timed(pairs[m][side], warmup)
                    runs[m, side].append(result)
                    say(f"repeat {r + 1}/{args.repeats}: {m} {side} {result['seconds']:.3g} s")
                if m not in exact_outputs:  # untimed, once
                    exact_outputs[m] = timed(pairs[m]["exact"])["outputs"]
                error = disagreement(m)
                if not error <= TOLERANCE:
                    say(f"error: {m}: graphcache and its reference disagree (max |difference| / max |reference| "
                        f"= {error:.3g} > {TOLERANCE:g}); their timings would not compare the same work")
                    return 1

    plain, plain_floor = summary(runs["none"])
    results = []
    for m in methods:
        schedule = pairs[m]["graphcache"].schedule
        flops_speedup = flops_json(schedule, model)["speedup"]
        (gc, gc_floor), (ref, ref_floor) = (summary(runs[m, side]) for side in sides)
        results.append({
            "method": m, "options": schedule.options, "flops_speedup": flops_speedup,
            "graphcache_seconds": gc, "reference_seconds": ref, "reference_over_graphcache": ref / gc,
            "graphcache_step_floor": gc_floor, "reference_step_floor": ref_floor,
            "reference_over_graphcache_step_floor": ref_floor / gc_floor,
            "realization": {"graphcache": plain / gc / flops_speedup, "reference": plain / ref / flops_speedup},
            "runs": {side: [run["seconds"] for run in runs[m, side]] for side in sides},
            "max_rel_difference": disagreement(m),
        })
    print(f"{args.model}, {args.sampler.upper()}-{args.steps}, cfg {args.cfg_scale}, one image, eager, "
          f"{torch.get_num_threads()} threads; uncached {plain:.3g} s per run (median of {args.repeats}), "
          f"step floor {plain_floor:.3g} s")
    print("| method | graphcache s | reference s | reference / graphcache | same, step floors | "
          "realization graphcache | realization reference |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['graphcache_seconds']:.3g} | {r['reference_seconds']:.3g} | "
              f"{r['reference_over_graphcache']:.2f}× | {r['reference_over_graphcache_step_floor']:.2f}× | "
              f"{r['realization']['graphcache']:.2f} | {r['realization']['reference']:.2f} |")
    if args.json:
        report = {"model": args.model, "steps": args.steps, "sampler": args.sampler, "cfg_scale": args.cfg_scale,
                  "repeats": args.repeats, "uncached_seconds": plain, "uncached_step_floor": plain_floor,
                  "uncached_runs": [run["seconds"] for run in runs["none"]],
                  "results": results}
        atomic_write(Path(args.json), lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
