#!/usr/bin/env python3
"""bf16 training step: this project's oneDNN path against torch and PEFT in bf16, interleaved.

One step = forward + backward of one adapted linear layer with x's gradient; W frozen. torch side
(CPU, bf16 weights and activations): the frozen nn.Linear alone, PEFT 0.21 LoRA and DoRA
(get_peft_model(...).to(torch.bfloat16)). This project's side: bench/bf16_step (W stored as bf16,
fp32 activations and adapter): base_bf16, lora_bf16, dora_bf16 on the oneDNN path and dora_f32 with
the backend off. Every repetition runs each method once, in an order that rotates, torch in this
process and bf16_step in its own (driven line by line through a pipe), 50 ms apart so that neither
side's spinning OpenMP threads slow the other; medians of --reps.

usage: bf16_compare.py --driver PATH [--threads 1 16] [--reps 7] [--out DIR]
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

SHAPES = [(4096, 4096, 16, 512), (11008, 4096, 64, 512)]


class Block(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.lin(x)


def build(method, d_out, d_in, r):
    torch.manual_seed(0)
    model = Block(d_in, d_out)
    if method == "frozen":
        model.requires_grad_(False)
    else:
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"], lora_dropout=0.0,
                            use_dora=(method == "dora"), init_lora_weights=False)
        model = get_peft_model(model, config)
        model.train()
    return model.to(torch.bfloat16)


def torch_step(model, x, dy):
    def step():
        x.grad = None
        for p in model.parameters():
            p.grad = None
        model(x).backward(dy)
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--driver", required=True)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count()])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    header = (f"CPU: {cpu}, {os.cpu_count()} logical cores; torch {torch.__version__}, peft {peft.__version__}, "
              f"python {platform.python_version()}; bf16; medians of {args.reps} interleaved steps after one warm-up")
    print(header, flush=True)
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for (d_out, d_in, r, n) in SHAPES:
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(n, d_in, generator=gen).to(torch.bfloat16).requires_grad_(True)
            dy = torch.randn(n, d_out, generator=gen).to(torch.bfloat16)
            steps = {"torch_frozen": torch_step(build("frozen", d_out, d_in, r), x, dy),
                     "peft_lora": torch_step(build("lora", d_out, d_in, r), x, dy),
                     "peft_dora": torch_step(build("dora", d_out, d_in, r), x, dy)}
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            drv = subprocess.Popen([args.driver, str(d_out), str(d_in), str(r), str(n)], env=env, text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            units = json.loads(drv.stdout.readline())

            def ours():
                drv.stdin.write("step\n")
                drv.stdin.flush()
                return json.loads(drv.stdout.readline())

            for s in steps.values():
                s()  # warm-up (bf16_step warmed itself up)
            times = {k: [] for k in list(steps) + ["base_bf16", "lora_bf16", "dora_bf16", "dora_f32"]}
            order = list(steps) + ["ours"]
            for rep in range(args.reps):
                for k in order[rep % len(order):] + order[:rep % len(order)]:
                    # The other process's OpenMP threads may still spin after its work: let them sleep.
                    time.sleep(0.05)
                    if k == "ours":
                        for name, ms in ours().items():
                            times[name].append(ms)
                    else:
                        t0 = time.perf_counter()
                        steps[k]()
                        times[k].append((time.perf_counter() - t0) * 1e3)
            drv.stdin.close()
            drv.wait()
            row = {"threads": threads, "d_out": d_out, "d_in": d_in, "r": r, "n": n, "units": units["units"],
                   "fallback": units["fallback"]}
            row.update({k: statistics.median(v) for k, v in times.items()})
            row["target_ms"] = 1.15 * (1 + r / (2 * n)) * row["torch_frozen"]
            results.append(row)
            print(json.dumps(row), flush=True)

    lines = [header, "",
             "| d_out/d_in/r/n | threads | oneDNN units | torch frozen | PEFT LoRA | PEFT DoRA | dora base bf16 "
             "| dora LoRA bf16 | dora DoRA bf16 | dora DoRA f32 path | target 1.15 (1 + r/2n) torch frozen "
             "| dora DoRA bf16 / torch frozen | PEFT DoRA / dora DoRA bf16 | dora f32 path / bf16 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results:
        met = "met" if row["dora_bf16"] <= row["target_ms"] else "not met"
        lines.append(
            f"| {row['d_out']}/{row['d_in']}/{row['r']}/{row['n']} | {row['threads']} | {row['units']} "
            f"| {row['torch_frozen']:.1f} | {row['peft_lora']:.1f} | {row['peft_dora']:.1f} | {row['base_bf16']:.1f} "
            f"| {row['lora_bf16']:.1f} | {row['dora_bf16']:.1f} | {row['dora_f32']:.1f} | {row['target_ms']:.1f} ({met}) "
            f"| {row['dora_bf16'] / row['torch_frozen']:.2f} | {row['peft_dora'] / row['dora_bf16']:.2f} "
            f"| {row['dora_f32'] / row['dora_bf16']:.2f} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "bf16_compare.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "bf16_compare.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
