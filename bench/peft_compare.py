#!/usr/bin/env python3
"""PEFT (torch, CPU) vs this project, side by side on one machine, same shapes and thread counts.

One training step = forward + backward of one adapted linear layer, fp32: x (n x d_in) needs its
gradient, the base weight is frozen, the adapter's parameters are trained. PEFT's model is a real
`get_peft_model` wrap of an nn.Linear; this project's numbers come from bench/step_driver (built
from this repo; see bench/README.md for the exact commands). Medians of `--reps` timed steps after
one warm-up step.

Then the evaluation forward at n = 1 and 32 (4096 x 4096, r = 16): torch's frozen nn.Linear,
PEFT's DoRA in eval mode without and with its norm cache (peft.helpers.DoraCaching, where this
PEFT has it), and step_driver's basefwd / lorainfer / dorainfer (dora's cached-norm evaluation).

usage: peft_compare.py --driver PATH [--threads 1 16] [--reps 5] [--out DIR]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import time

import torch
from torch import nn
import peft
from peft import LoraConfig, get_peft_model

SHAPES = [(4096, 4096, 16, 512), (11008, 4096, 64, 512), (4096, 4096, 16, 32)]


class Block(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.lin(x)


def build(method, d_out, d_in, r):
    torch.manual_seed(0)
    model = Block(d_in, d_out)
    if method == "base":
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"], lora_dropout=0.0,
                        use_dora=(method == "dora"), init_lora_weights=False)
    model = get_peft_model(model, config)
    model.train()
    return model


def time_peft(method, d_out, d_in, r, n, reps):
    model = build(method, d_out, d_in, r)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, d_in, generator=gen).requires_grad_(True)
    dy = torch.randn(n, d_out, generator=gen)

    def step():
        x.grad = None
        for p in model.parameters():
            p.grad = None
        y = model(x)
        y.backward(dy)

    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


EVAL_SHAPES = [(4096, 4096, 16, 1), (4096, 4096, 16, 32)]


def time_peft_eval(method, d_out, d_in, r, n, reps, cached=False):
    """Median ms of an evaluation forward (no grad). cached: inside peft.helpers.DoraCaching."""
    model = build(method, d_out, d_in, r)
    model.eval()
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(1))
    ctx = None
    if cached:
        try:
            from peft.helpers import DoraCaching
        except ImportError:
            return float("nan")
        ctx = DoraCaching()
        ctx.__enter__()
    try:
        with torch.no_grad():
            model(x)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    return statistics.median(times)


def time_dora(driver, threads, d_out, d_in, r, n, reps,
              methods=("base", "lora", "dora", "doraexact", "doradense")):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([driver, str(d_out), str(d_in), str(r), str(n), str(reps), *methods], env=env, check=True,
                         capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {row["method"]: row["median_ms"] for row in rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--driver", required=True)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count()])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()

    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    header = (f"CPU: {cpu}, {os.cpu_count()} logical cores; torch {torch.__version__}, peft {peft.__version__}, "
              f"python {platform.python_version()}; fp32; median of {args.reps} steps after one warm-up")
    print(header, flush=True)
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for (d_out, d_in, r, n) in SHAPES:
            row = {"threads": threads, "d_out": d_out, "d_in": d_in, "r": r, "n": n}
            for method in ("base", "lora", "dora"):
                row["peft_" + method] = time_peft(method, d_out, d_in, r, n, args.reps)
            ours = time_dora(args.driver, threads, d_out, d_in, r, n, args.reps)
            for k, v in ours.items():
                row["dora_" + k] = v
            results.append(row)
            print(json.dumps(row), flush=True)

    lines = [header, "",
             "| shape d_out/d_in/r/n | threads | PEFT base | PEFT LoRA | PEFT DoRA | PEFT DoRA/LoRA "
             "| dora base | dora LoRA | dora DoRA | dora DoRA exact | dora DoRA dense | dora DoRA/LoRA "
             "| dora DoRA exact/LoRA | PEFT DoRA / dora DoRA |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results:
        lines.append(
            f"| {row['d_out']}/{row['d_in']}/{row['r']}/{row['n']} | {row['threads']} "
            f"| {row['peft_base']:.1f} | {row['peft_lora']:.1f} | {row['peft_dora']:.1f} "
            f"| {row['peft_dora'] / row['peft_lora']:.2f} "
            f"| {row['dora_base']:.1f} | {row['dora_lora']:.1f} | {row['dora_dora']:.1f} | {row['dora_doraexact']:.1f} "
            f"| {row['dora_doradense']:.1f} | {row['dora_dora'] / row['dora_lora']:.3f} "
            f"| {row['dora_doraexact'] / row['dora_lora']:.3f} | {row['peft_dora'] / row['dora_dora']:.2f} |")
    lines += ["", "Evaluation forward (no grad), ms:", "",
              "| shape d_out/d_in/r/n | threads | torch frozen Linear | PEFT DoRA eval | PEFT DoRA eval, DoraCaching "
              "| dora base fwd | dora LoRA infer | dora DoRA infer (cached norm) | dora DoRA / torch frozen |",
              "|---|---|---|---|---|---|---|---|---|"]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for (d_out, d_in, r, n) in EVAL_SHAPES:
            row = {"threads": threads, "d_out": d_out, "d_in": d_in, "r": r, "n": n, "eval": True,
                   "torch_base": time_peft_eval("base", d_out, d_in, r, n, args.reps),
                   "peft_dora": time_peft_eval("dora", d_out, d_in, r, n, args.reps),
                   "peft_dora_cached": time_peft_eval("dora", d_out, d_in, r, n, args.reps, cached=True)}
            ours = time_dora(args.driver, threads, d_out, d_in, r, n, args.reps, ("basefwd", "lorainfer", "dorainfer"))
            row.update({"dora_" + k: v for k, v in ours.items()})
            results.append(row)
            print(json.dumps(row), flush=True)
            lines.append(f"| {d_out}/{d_in}/{r}/{n} | {threads} | {row['torch_base']:.3f} | {row['peft_dora']:.3f} "
                         f"| {row['peft_dora_cached']:.3f} | {row['dora_basefwd']:.3f} | {row['dora_lorainfer']:.3f} "
                         f"| {row['dora_dorainfer']:.3f} | {row['dora_dorainfer'] / row['torch_base']:.2f} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "peft_compare.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "peft_compare.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
