#!/usr/bin/env python
"""Time one full sampling run of a random-weight DiT, uncached (`none`) vs FORA.

    python tools/bench_foundation.py                       # DiT-XL/2, DDIM-50, cfg 1.5: minutes on CPU
    python tools/bench_foundation.py --json bench.json     # also write the figures as JSON
    python tools/bench_foundation.py --model-size DiT-S/2 --steps 5 --repeats 1   # a quick smoke run

One image (one class label; with guidance the model sees a batch of 2), every weight N(0, 0.02)
(`init_random_`, nothing downloaded). Each method gets `--warmup` untimed runs, then `--repeats`
timed ones; the table shows the median and the speedup over `none` on the same device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import graphcache  # noqa: E402
from graphcache.bench import time_sampling  # noqa: E402
from graphcache.models.dit import DIT_CONFIGS, DiT, dit_config, init_random_  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model-size", default="DiT-XL/2", choices=sorted(DIT_CONFIGS), help="default: DiT-XL/2")
    p.add_argument("--input-size", type=int, default=32, help="latent size (default: 32, i.e. 256px)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default: 50)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="default: 1.5")
    p.add_argument("--interval", type=int, default=3, help="FORA interval (default: 3)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    p.add_argument("--label", type=int, default=207, help="class label of the image (default: 207)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = dit_config(args.model_size, input_size=args.input_size)
    model = init_random_(DiT(config), seed=0).eval().to(args.device)
    label = args.label % config.num_classes
    runs = [("none", {}), ("fora", {"interval": args.interval})]
    results = []
    for method, options in runs:
        cached = graphcache.optimize(model, method, args.steps, **options)
        timing = time_sampling(cached, labels=[label], num_steps=args.steps, sampler="ddim",
                               cfg_scale=args.cfg_scale, repeats=args.repeats, warmup=args.warmup, seed=0)
        results.append({"method": method, "options": dict(cached.options), **timing})
    base = results[0]["seconds"]
    for r in results:
        r["speedup"] = base / r["seconds"] if r["seconds"] > 0 else None

    print(f"{args.model_size} input {args.input_size}, DDIM-{args.steps}, cfg {args.cfg_scale}, 1 image, "
          f"{args.device} ({torch.get_num_threads()} threads), median of {args.repeats} after {args.warmup} warm-up")
    print(f"{'method':<22} {'seconds':>9} {'speedup':>8}")
    for r in results:
        name = r["method"] + "".join(f" {k}={v}" for k, v in r["options"].items())
        print(f"{name:<22} {r['seconds']:>9.3f} {r['speedup']:>7.2f}x")

    if args.json:
        report = {
            "model": args.model_size, "input_size": args.input_size, "steps": args.steps, "sampler": "ddim",
            "cfg_scale": args.cfg_scale, "images": 1, "repeats": args.repeats, "warmup": args.warmup,
            "device": args.device, "threads": torch.get_num_threads(),
            "versions": {"graphcache": graphcache.__version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "results": results,
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
