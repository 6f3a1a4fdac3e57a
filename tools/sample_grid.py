"""Picture for the README: the same seeds sampled uncached and with every method, one row each.

    python tools/sample_grid.py                      # shipped MNIST model -> docs/samples.png
    python tools/sample_grid.py --steps 50 --cfg-scale 1.5 --out docs/samples.png
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import graphcache  # noqa: E402
from graphcache.methods import METHODS  # noqa: E402
from graphcache.models.builtin import DEFAULT_MODEL, resolve_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--per-class", type=int, default=1, help="images per digit class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/samples.png")
    args = p.parse_args(argv)
    model = resolve_model(args.model)
    labels = [c for c in range(model.num_classes) for _ in range(args.per_class)]
    rows = []
    for name in METHODS:
        cached = graphcache.optimize(model, name, num_steps=args.steps)
        images = graphcache.sample(cached, labels, seed=args.seed, num_steps=args.steps, cfg_scale=args.cfg_scale,
                                   guidance="eps")
        rows.append((name, images.clamp(-1, 1)))
    fig, axes = plt.subplots(len(rows), len(labels), figsize=(len(labels) * 0.8, len(rows) * 0.9))
    for r, (name, images) in enumerate(rows):
        for c in range(len(labels)):
            ax = axes[r][c]
            ax.imshow(images[c, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(f"{args.model}, DDIM-{args.steps}, cfg {args.cfg_scale}, seed {args.seed}: same noise per column",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
