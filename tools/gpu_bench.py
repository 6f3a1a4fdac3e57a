"""DiT-XL/2 on one CUDA GPU in bf16: every method at its paper settings on eager, compile and
compile with CUDA graphs, one table and one JSON, inside a time budget.

The model is `builtin:dit-xl2-random` (every weight N(0, 0.02), adaLN gates included) cast to bf16;
DDIM-50, cfg 1.5, a batch of 8 images (16 rows with guidance), the same seeds for every run.
Backends, in this order (the most useful figures first):

    eager             the rewritten GraphModules
    compile           torch.compile(fullgraph=True), Inductor, default mode
    reduce-overhead   the same with mode="reduce-overhead" (CUDA graphs)

On each backend every method is built (`graphcache.bench.BenchSession`) and run once untimed (a
compile backend compiles there), then the timed runs go in rounds (none, fora, toca, ...) so that
a drifting machine slows all alike; CUDA is synchronised around each run. Per method: median
seconds per run, images/s, speedup over `none` on the same backend (median of the rounds' ratios),
FLOPs speedup (graphcache.flops), realization (speedup / FLOPs speedup), PSNR against the eager
uncached output of the same dtype (and, in the JSON, against `none` on the same backend),
compilations and graph breaks (torch._dynamo counters), CUDA graphs recorded and skipped, peak
CUDA memory.

Time budget: a cell (backend, method) starts only if its estimated build, compile and runs end
before --budget seconds from the start; the others are listed as skipped. The JSON is rewritten
after every cell, so a run killed from outside keeps what it measured.

    python tools/gpu_bench.py --out runs/gpu_bench.json             # the H200 run (about 6 min)
    python tools/gpu_bench.py --quick --out /tmp/gpu_bench.json     # CPU smoke run: tiny DiT, 4 steps, float32
    python tools/gpu_bench.py --quick --compiler aot_eager --out /tmp/gpu_bench.json   # every cell, in a minute or two
"""

from __future__ import annotations

import time

START = time.monotonic()  # before torch's import: the budget counts the whole process

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from graphcache import metrics  # noqa: E402
from graphcache.bench import FLOPS_COUNTING, BenchSession  # noqa: E402
from graphcache.methods import METHODS, get_method  # noqa: E402
from graphcache.models.builtin import resolve_model  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# label -> (graphcache backend, compile mode)
BACKENDS = {"eager": ("eager", None), "compile": ("compile", None), "reduce-overhead": ("compile", "reduce-overhead")}
# guesses until a cell has measured them (seconds)
FIRST_COMPILE_GUESS = 60.0  # one variant, with the compiler's one-time start-up
WRITE_RESERVE = 5.0  # the JSON and the tables at the end


def elapsed() -> float:
    return time.monotonic() - START


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Counters: compilations, graph breaks, CUDA graphs
# --------------------------------------------------------------------------------------------


def cudagraphs_recorded(device: torch.device) -> int | None:
    """CUDA graphs Inductor's CUDA graph trees hold on `device` (None off CUDA or if unreadable)."""
    if device.type != "cuda":
        return None
    try:
        from torch._inductor import cudagraph_trees

        manager = cudagraph_trees.get_manager(device.index or 0, create_if_none_exists=False)
    except Exception:
        return None
    if manager is None or manager.roots is None:
        return 0
    count, stack = 0, [n for nodes in manager.roots.values() for n in nodes]
    while stack:
        node = stack.pop()
        count += 1
        stack.extend(c for children in node.children.values() for c in children)
    return count


def snapshot(device: torch.device) -> dict:
    from torch._dynamo.utils import counters

    return {
        "compilations": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
        "cudagraphs_recorded": cudagraphs_recorded(device),
    }


def add_delta(stats: dict, before: dict, after: dict, suffix: str = "") -> None:
    for key, value in after.items():
        if value is None or before[key] is None:
            stats.setdefault(key + suffix, None)
        else:
            stats[key + suffix] = (stats.get(key + suffix) or 0) + value - before[key]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpus": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
        try:
            import subprocess

            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = out.stdout.strip() or None
        except Exception:
            info["driver"] = None
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def fmt(value, spec: str, none: str = "–") -> str:
    if value is None:
        return none
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return format(value, spec)


def table(cells: list[dict]) -> str:
    """One markdown table, a row per measured (backend, method)."""
    lines = ["| backend | method | s/run | images/s | speedup | FLOPs speedup | realization | PSNR vs eager none (dB) "
             "| compilations | graph breaks | CUDA graphs | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        graphs = c.get("cudagraphs_recorded")
        lines.append(
            f"| {c['backend_label']} | {c['method']} | {c['seconds']:.3f} | {c['images_per_s']:.1f} | "
            f"{c['speedup']:.2f}× | {c['flops_speedup']:.2f}× | {c['realization']:.2f} | "
            f"{fmt(c['psnr_vs_eager_none'], '.1f')} | {fmt(c.get('compilations'), 'd')} | "
            f"{fmt(c.get('graph_breaks'), 'd')} | {fmt(graphs, 'd')} | {c['peak_memory_bytes'] / 2**30:.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# One backend
# --------------------------------------------------------------------------------------------


class Budget:
    """What the cells measured so far, to guess whether the next one ends before the deadline."""

    def __init__(self, deadline: float, repeats: int):
        self.deadline, self.repeats = deadline, repeats  # deadline: seconds from the start
        self.run_seconds: dict[str, float] = {}  # method -> an eager timed run (an upper bound)
        self.build_seconds: dict[str, float] = {}  # method -> its eager build
        # backend label -> the last method's compile seconds per variant; `none`'s, the first,
        # includes the compiler's start-up and the kernels every later variant shares: 0.6 of it
        self.compile_per_variant: dict[str, float] = {}

    def left(self) -> float:
        return self.deadline - elapsed()

    def run_guess(self, method: str) -> float:
        known = list(self.run_seconds.values())
        return self.run_seconds.get(method, max(known) if known else 0.0)

    def cell_guess(self, label: str, compiles: bool, method: str, variants: int) -> float:
        """Seconds to build and warm up `method`, plus its share of the timed rounds."""
        seconds = self.build_seconds.get(method, max(self.build_seconds.values(), default=0.0))
        seconds += (1 + self.repeats) * self.run_guess(method)
        if compiles:
            per_variant = self.compile_per_variant.get(label)
            if per_variant is None:  # this backend's first cell: the other compile mode's, or a guess
                others = [v for k, v in self.compile_per_variant.items() if k != label]
                per_variant = max(others) if others else FIRST_COMPILE_GUESS
            seconds += variants * per_variant
        return seconds


def run_backend(label: str, model, args, budget: Budget, reference, methods: list[str], device) -> dict:
    backend, mode = BACKENDS[label]
    compiles = backend == "compile"
    compile_options = None
    if compiles:
        compile_options = {"backend": args.compiler, "mode": mode}
    out = {"label": label, "backend": backend, "compile_mode": mode or ("default" if compiles else None),
           "results": [], "skipped": [], "failed": [], "started_at_s": round(elapsed(), 1)}
    if mode == "reduce-overhead" and args.compiler != "inductor":
        reason = f"mode reduce-overhead needs the inductor compiler, not {args.compiler}"
        out["skipped"] = [{"method": m, "reason": reason} for m in methods]
        return out
    session = BenchSession(model, backend=backend, compile_options=compile_options, num_steps=args.steps,
                           batch=args.batch, cfg_scale=args.cfg_scale, seed=args.seed, interleaved=True)
    entries = []
    # build and warm up (compile) the cheapest methods first: `none` (the baseline) and those of
    # fewest variants, so a budget cut drops the costliest compilations
    config = model.config
    tokens = (config.input_size // config.patch_size) ** 2

    def variants_of(name):
        return len(get_method(name).schedule(args.steps, config.depth, {}, tokens).variants())

    order = sorted(methods, key=lambda m: (m != "none", variants_of(m) if compiles else 0, methods.index(m)))
    for name in order:
        if name != "none" and not entries:
            out["skipped"].append({"method": name, "reason": "no baseline: none did not run on this backend"})
            continue
        guess = budget.cell_guess(label, compiles, name, variants_of(name))
        if guess > budget.left() - WRITE_RESERVE:
            out["skipped"].append({"method": name, "reason": f"time budget: needs about {guess:.0f} s, "
                                                               f"{budget.left():.0f} s left"})
            log(f"{label}/{name}: skipped (needs about {guess:.0f} s, {budget.left():.0f} s left)")
            continue
        try:
            log(f"{label}/{name}: build (estimated {guess:.0f} s with its runs, {budget.left():.0f} s left)")
            entry = session.build(name, {})
            entry["stats"] = {}
            before = snapshot(device)
            log(f"{label}/{name}: warm-up run ({len(entry['cached'].variants)} variants)")
            warm = session.run(entry, timed=False)
            add_delta(entry["stats"], before, snapshot(device))
        except Exception as e:  # one broken cell must not cost the others
            traceback.print_exc()
            out["failed"].append({"method": name, "phase": "build/warm-up", "error": f"{type(e).__name__}: {e}"[:2000]})
            log(f"{label}/{name}: FAILED ({type(e).__name__})")
            gc.collect()
            continue
        entry["warmup_seconds"] = warm
        variants = len(entry["cached"].variants)
        if label == "eager":
            budget.build_seconds[name] = entry["build_seconds"]
        if compiles:
            per_variant = max(warm - budget.run_guess(name), 0.0) / variants
            budget.compile_per_variant[label] = per_variant * (0.6 if name == "none" else 1.0)
        log(f"{label}/{name}: built in {entry['build_seconds']:.1f} s, warm-up {warm:.2f} s")
        entries.append(entry)
    # timed rounds, in the methods' canonical order
    entries.sort(key=lambda e: methods.index(e["name"]))
    live = list(entries)
    for r in range(args.repeats if live else 0):
        guess = sum(e["times"][-1] if e["times"] else (budget.run_guess(e["name"]) or e["warmup_seconds"])
                    for e in live)
        if r > 0 and guess > budget.left() - WRITE_RESERVE:
            log(f"{label}: stopped after {r} timed rounds (time budget)")
            out["rounds_cut"] = r
            break
        for entry in list(live):
            try:
                before = snapshot(device)
                session.run(entry, timed=True)
                add_delta(entry["stats"], before, snapshot(device), "_timed")
            except Exception as e:
                traceback.print_exc()
                out["failed"].append({"method": entry["name"], "phase": f"timed round {r + 1}",
                                      "error": f"{type(e).__name__}: {e}"[:2000]})
                live.remove(entry)
                continue
        log(f"{label}: round {r + 1}: " + ", ".join(f"{e['name']} {e['times'][-1]:.3f}s" for e in live if e["times"]))
    base = next((e for e in live if e["name"] == "none" and e["times"]), None)
    if reference is None and label == "eager" and base is not None:
        reference = base["output"]  # the eager uncached output: every backend's fidelity reference
    for entry in live:
        if base is None or not entry["times"]:
            continue
        r = session.report(entry, base)
        r.pop("kinds")
        r.update(entry["stats"])
        r["backend_label"] = label
        r["warmup_seconds"] = entry["warmup_seconds"]
        r["images_per_s"] = args.batch / r["seconds"]
        scored = reference is not None and entry["output"] is not reference
        r["psnr_vs_eager_none"] = metrics.psnr(entry["output"], reference) if scored else None
        r["rel_l2_vs_eager_none"] = metrics.rel_l2(entry["output"], reference) if scored else None
        out["results"].append(r)
        if label == "eager":
            budget.run_seconds[entry["name"]] = r["seconds"]
    out["none_output"] = None if base is None else base["output"]
    out["report"] = session.summary([], args.model)
    out["seconds_spent"] = round(elapsed() - out["started_at_s"], 1)
    del session, entries, live, base
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the JSON report (rewritten after every cell)")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: builtin:dit-tiny-random, float32, 4 steps, batch 2, 2 rounds, 180 s budget "
                        "(each default below can still be overridden)")
    p.add_argument("--model", default=None, help="default builtin:dit-xl2-random")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default bf16")
    p.add_argument("--device", default=None, help="default cuda")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps, default 50")
    p.add_argument("--batch", type=int, default=None, help="images per run, default 8 (16 rows with cfg)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds, default 3")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--compiler", default="inductor",
                   help="torch.compile backend of the compile cells (aot_eager: a fast CPU check of the script)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds from the start by which every cell must have ended, by estimate "
                        "(default 350; quick 180)")
    args = p.parse_args(argv)
    quick = dict(model="builtin:dit-tiny-random", dtype="fp32", device="cpu", steps=4, batch=2, repeats=2, budget=180.0)
    full = dict(model="builtin:dit-xl2-random", dtype="bf16", device="cuda", steps=50, batch=8, repeats=3, budget=350.0)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    methods = [m for m in args.methods.split(",") if m]
    if "none" not in methods:
        methods.insert(0, "none")
    unknown = [m for m in methods if m not in METHODS] + [b for b in args.backends.split(",") if b not in BACKENDS]
    if unknown:
        p.error(f"unknown method or backend: {', '.join(unknown)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: pass --quick (or --device cpu)")
    budget = Budget(args.budget, args.repeats)
    dtype = DTYPES[args.dtype]

    log(f"loading {args.model} ({args.dtype}, {device})")
    model = resolve_model(args.model).to(device=device, dtype=dtype)
    info = machine(device)
    log(f"machine: {json.dumps(info)}")
    doc = {
        "command": "python tools/gpu_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "settings": {"model": args.model, "dtype": args.dtype, "steps": args.steps, "sampler": "ddim",
                     "cfg_scale": args.cfg_scale, "guidance": "official", "batch": args.batch,
                     "rows_per_step": args.batch * (2 if args.cfg_scale > 1 else 1), "repeats": args.repeats,
                     "warmup": 1, "seed": args.seed, "compiler": args.compiler, "budget_s": args.budget,
                     "methods": methods},
        "flops_counting": FLOPS_COUNTING,
        "backends": [],
        "finished": False,
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write(final: bool = False) -> None:
        cells = [r for b in doc["backends"] for r in b["results"]]
        doc["table"] = table(cells)
        doc["elapsed_s"] = round(elapsed(), 1)
        doc["finished"] = final
        clean = {**doc, "backends": [{k: v for k, v in b.items() if k != "none_output"} for b in doc["backends"]]}
        tmp = out_path.with_suffix(out_path.suffix + ".tmp")
        tmp.write_text(json.dumps(clean, indent=2, default=lambda v: None if v is None else repr(v)))
        tmp.replace(out_path)

    reference = None
    for label in args.backends.split(","):
        log(f"== {label}")
        result = run_backend(label, model, args, budget, reference, methods, device)
        doc["backends"].append(result)
        if label == "eager" and result.get("none_output") is not None:
            reference = result["none_output"]
        write()
        if result["results"]:
            print(table(result["results"]), flush=True)
    write(final=True)
    cells = [r for b in doc["backends"] for r in b["results"]]
    skipped = [f"{b['label']}/{s['method']} ({s['reason']})" for b in doc["backends"] for s in b["skipped"]]
    failed = [f"{b['label']}/{f['method']} ({f['phase']}: {f['error'][:200]})" for b in doc["backends"]
              for f in b["failed"]]
    print(f"\n{info.get('gpu', info.get('cpu'))}, torch {info['torch']}, {args.model} {args.dtype}, "
          f"DDIM-{args.steps}, cfg {args.cfg_scale}, batch {args.batch}; {elapsed():.0f} s")
    print(table(cells))
    if skipped:
        print("skipped: " + "; ".join(skipped))
    if failed:
        print("FAILED: " + "; ".join(failed))
    print(f"wrote {out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
