"""EOC on the shipped MNIST DiT: FD and fidelity to the uncached output with and without the
correction, over several evaluation seeds, and its extra wall-clock.

    OMP_NUM_THREADS=1 python tools/eoc_bench.py --json eoc.json --markdown eoc.md

* The prior is calibrated once (graphcache.calibration.calibrate: one sample per class from seed 1000,
  as many held out from seed 2000), disjoint from the evaluation seeds 0, 1, ...
* Per evaluation seed: `--per-seed` images (classes in turn), DDIM-20, guidance 1.5; FD against the
  real MNIST features (graphcache.metrics), PSNR and relative L2 against the uncached images of
  the same seed.
* Bases: FORA at EOC's levels 25/50/75 % with three EOC settings each (the authors' first code:
  λ = 0.01 on every cached step; λ = 0.01 with the held-out judgment; the least-squares λ, >= 0),
  then toca, duca, taylorseer and clusca (their defaults) with that default setting and the
  least-squares λ of either sign. `--bases` picks some of them.
* An improvement counts as beyond the spread when its mean over seeds (paired: the same seed with
  and without EOC) exceeds the seed-to-seed standard deviation of the base method's metric.
* Wall-clock: base and EOC sampling runs alternate (`--repeats` pairs, batch `--time-batch`), and
  the extra time is the median of the pairs' ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import graphcache
from graphcache import metrics
from graphcache.calibration import calibrate
from graphcache.io import atomic_write
from graphcache.models.builtin import resolve_model

STEPS, CFG = 20, 1.5
PAPER_FID_GAIN = {25: 4.6, 50: 15.1, 75: 28.8}  # FORA + EOC on DiT-XL/2, DDIM-20 (arXiv 2501.19243)
SETTINGS = {
    "authors": {"eoc_lambda": 0.01, "eoc_judgment": "all"},
    "judged": {"eoc_lambda": 0.01, "eoc_judgment": "held-out"},
    "fitted": {"eoc_lambda": "fit", "eoc_judgment": "held-out"},
    "signed": {"eoc_lambda": "signed-fit", "eoc_judgment": "held-out"},
}
BASES = ["fora-25", "fora-50", "fora-75", "toca", "duca", "taylorseer", "clusca"]
DEFAULT_SETTING = "fitted"


def images(model, seed, count):
    return graphcache.sample(model, [i % 10 for i in range(count)], seed=seed, num_steps=STEPS, cfg_scale=CFG)


def scores(out, reference, real):
    return {"fd": metrics.frechet_distance(metrics.features(out), real), "psnr": metrics.psnr(out, reference),
            "rel_l2": metrics.rel_l2(out, reference)}


def mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def compare(base, eoc):
    """Paired per-seed improvements of `eoc` over `base` and the verdict per metric."""
    fd_gain = [100 * (b["fd"] - e["fd"]) / b["fd"] for b, e in zip(base, eoc)]
    psnr_gain = [e["psnr"] - b["psnr"] for b, e in zip(base, eoc)]
    l2_gain = [100 * (b["rel_l2"] - e["rel_l2"]) / b["rel_l2"] for b, e in zip(base, eoc)]
    fd_spread = mean_std([b["fd"] for b in base])[1]
    fd_delta = statistics.fmean(b["fd"] - e["fd"] for b, e in zip(base, eoc))
    return {
        "fd_gain_pct": mean_std(fd_gain), "psnr_gain_db": mean_std(psnr_gain), "rel_l2_gain_pct": mean_std(l2_gain),
        "fd_delta": fd_delta, "fd_seed_spread": fd_spread, "fd_beyond_spread": fd_delta > fd_spread,
        "psnr_beyond_spread": statistics.fmean(psnr_gain) > mean_std([b["psnr"] for b in base])[1],
    }


def time_pair(base, eoc, repeats, batch):
    """Median ratio eoc/base of alternating sampling runs (after one warm-up run each)."""
    ratios, seconds = [], {"base": [], "eoc": []}
    for i in range(repeats + 1):
        for name, model in (("base", base), ("eoc", eoc)):
            start = time.perf_counter()
            images(model, 0, batch)
            if i:
                seconds[name].append(time.perf_counter() - start)
        if i:
            ratios.append(seconds["eoc"][-1] / seconds["base"][-1])
    return {"ratio": statistics.median(ratios), "base_s": statistics.median(seconds["base"]),
            "eoc_s": statistics.median(seconds["eoc"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5, help="evaluation seeds 0..N-1 (default: 5)")
    p.add_argument("--per-seed", type=int, default=100, help="images per seed (default: 100)")
    p.add_argument("--repeats", type=int, default=5, help="timed base/EOC pairs per FORA level (default: 5)")
    p.add_argument("--time-batch", type=int, default=16, help="images per timed run (default: 16)")
    p.add_argument("--prior", help="use this prior instead of calibrating one")
    p.add_argument("--bases", default=",".join(BASES), help=f"comma-separated subset of {','.join(BASES)}")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", help="write the tables here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = resolve_model("builtin:mnist-dit")
    real = metrics.reference_features()
    started = time.perf_counter()
    prior = args.prior
    if prior is None:
        prior = str(Path(tempfile.mkdtemp()) / "prior.safetensors")
        calibrate(model, STEPS, cfg_scale=CFG).save(prior)
    seeds = list(range(args.seeds))
    uncached = {s: images(model, s, args.per_seed) for s in seeds}
    report = {"model": "builtin:mnist-dit", "steps": STEPS, "cfg_scale": CFG, "seeds": seeds,
              "per_seed": args.per_seed, "settings": SETTINGS, "default_setting": DEFAULT_SETTING,
              "uncached_fd": mean_std([metrics.frechet_distance(metrics.features(uncached[s]), real) for s in seeds]),
              "rows": []}

    def evaluate(method, options):
        cached = graphcache.optimize(model, method, STEPS, **options)
        return cached, [scores(images(cached, s, args.per_seed), uncached[s], real) for s in seeds]

    bases = []
    for name in args.bases.split(","):
        if name not in BASES:
            p.error(f"unknown base {name!r}: choose from {', '.join(BASES)}")
        method, _, level = name.partition("-")
        if level:
            bases.append((method, {"level": int(level)}, ["authors", "judged", "fitted"]))
        else:
            bases.append((method, {}, [DEFAULT_SETTING, "signed"]))
    for method, options, settings in bases:
        base_model, base = evaluate(method, options)
        row = {"method": method, "options": options, "base": base, "eoc": {}}
        for name in settings:
            eoc_model, eoc = evaluate(method, {**options, "eoc": prior, **SETTINGS[name]})
            row["eoc"][name] = {"scores": eoc, "vs_base": compare(base, eoc)}
            if name == DEFAULT_SETTING and method == "fora":
                row["timing"] = time_pair(base_model, eoc_model, args.repeats, args.time_batch)
            print(f"{method} {options} {name}: {row['eoc'][name]['vs_base']}", file=sys.stderr)
        report["rows"].append(row)
    report["seconds"] = time.perf_counter() - started
    report["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    report["machine"] = f"{platform.processor() or platform.machine()}, 1 thread, torch {torch.__version__}"
    text = markdown(report)
    print(text)
    if args.json:
        atomic_write(Path(args.json), lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    if args.markdown:
        atomic_write(Path(args.markdown), lambda tmp: tmp.write_text(text))
    return 0


def _pm(pair, digits=2):
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def markdown(report) -> str:
    n = len(report["seeds"])
    lines = [
        f"Uncached FD: {_pm(report['uncached_fd'])} ({n} seeds × {report['per_seed']} images). "
        "Mean ± seed-to-seed standard deviation; gains are paired per seed (positive = EOC better).",
        "",
        "| base | EOC setting | FD base | FD with EOC | FD gain % | beyond spread | PSNR base (dB) | PSNR gain (dB) "
        "| rel. L2 gain % | extra time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        label = row["method"] + (f" {row['options']['level']} %" if "level" in row["options"] else "")
        base_fd = mean_std([s["fd"] for s in row["base"]])
        base_psnr = mean_std([s["psnr"] for s in row["base"]])
        for name, eoc in row["eoc"].items():
            v = eoc["vs_base"]
            fd = mean_std([s["fd"] for s in eoc["scores"]])
            timing = row.get("timing") if name == report["default_setting"] else None
            extra = f"{100 * (timing['ratio'] - 1):+.1f} %" if timing else ""
            lines.append(
                f"| {label} | {name} | {_pm(base_fd)} | {_pm(fd)} | {_pm(v['fd_gain_pct'], 1)} | "
                f"{'yes' if v['fd_beyond_spread'] else 'no'} | {_pm(base_psnr)} | {_pm(v['psnr_gain_db'])} | "
                f"{_pm(v['rel_l2_gain_pct'], 1)} | {extra} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
