"""Run every method at its paper settings and write one table (markdown + JSON).

Paper settings are each method's defaults (DiT, DDIM-50, cfg 1.5): FORA N=3; ToCa N=3 R=93%
(fresh_ratio 0.07, ToCa-ddim50); DuCa N=3 (fresh_ratio 0.05); ClusCa N=5 K=16 order 4 γ=0.005;
TaylorSeer N=4 order 4. Every figure is relative to `none` on the same backend in the same run.

    python tools/reproduce.py                                   # shipped MNIST DiT + DiT-XL/2-size random
    python tools/reproduce.py --models builtin:dit-xl2-random --batch 1 --repeats 2 --warmup 0
    python tools/reproduce.py --models builtin:dit-tiny-random --steps 5 --repeats 1 --out /tmp/r   (smoke)

The XL run is slow on a CPU (minutes per method): run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from graphcache.bench import FLOPS_COUNTING, bench
from graphcache.methods import METHODS
from graphcache.models.builtin import resolve_model


def _row(model: str, r: dict) -> str:
    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    return (
        f"| {model} | {r['method']} | {r['seconds']:.3f} | {r['speedup']:.2f}× | {r['flops'] / 1e12:.3f} | "
        f"{r['flops_speedup']:.2f}× | {r['realization']:.2f} | {f(r['psnr'], '.2f')} | {f(r['ssim'], '.4f')} | "
        f"{f(r['rel_l2'], '.4f')} | {f(r['accuracy'], '.1%')} | {f(r['fd'], '.2f')} | "
        f"{r['cache_bytes'] / 2**20:.1f} |"
    )


def markdown(reports: list[dict]) -> str:
    lines = [
        "| model | method | s/run | speedup | TFLOPs | FLOPs speedup | realization | PSNR | SSIM | rel L2 | "
        "accuracy | FD | cache MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rep in reports:
        lines += [_row(rep["model"], r) for r in rep["results"]]
    meta = ", ".join(f"{rep['model']}: batch {rep['batch']}, {rep['steps']} {rep['sampler']} steps, "
                     f"cfg {rep['cfg_scale']}, {rep['backend']} on {rep['device']}" for rep in reports)
    return "\n".join(lines) + f"\n\n{meta}. torch {torch.__version__}, {os.cpu_count()} CPUs.\n\n{FLOPS_COUNTING}\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="builtin:mnist-dit,builtin:dit-xl2-random",
                   help="comma-separated models (default: the shipped MNIST DiT and the XL-size random model)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: all)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", default="auto",
                   help="images per run; auto: 100 for MNIST models (accuracy and FD need many), else 1")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--out", default="runs/reproduce", help="directory for table.md and results.json")
    args = p.parse_args(argv)
    reports = []
    for spec in args.models.split(","):
        model = resolve_model(spec)
        batch = int(args.batch) if args.batch != "auto" else (100 if model.in_channels == 1 else 1)
        print(f"== {spec}: batch {batch}, {args.steps} steps", file=sys.stderr)
        reports.append(bench(model, [(m, {}) for m in args.methods.split(",")], num_steps=args.steps, batch=batch,
                             repeats=args.repeats, warmup=args.warmup, model_name=spec, progress=True,
                             guidance="eps" if model.in_channels == 1 else "official"))
        del model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(reports, indent=2))
    table = markdown(reports)
    (out / "table.md").write_text(table)
    print(table)
    print(f"wrote {out / 'table.md'} and {out / 'results.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
