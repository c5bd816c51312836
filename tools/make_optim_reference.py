#!/usr/bin/env python3
"""Reference data for dora's optimizers: torch.optim on a fixed gradient sequence.

Each case has three parameter tensors, shaped like one DoRA adapter's (A 4 x 6, B 5 x 4, m 5), in
three parameter groups as a DoRA trainer sets them up: A (lr, weight decay), B (lr x 4, as LoRA+,
weight decay), m (lr, no weight decay). For 100 steps: the gradients are fixed random tensors (recorded),
clip_grad_norm_(all, max_norm) runs before each step (when the case clips), the optimizer steps, and a
LambdaLR with linear warm-up (10 steps) then cosine decay to 0 at step 100 (when the case schedules)
steps after it, as in a usual loop:

    for t in range(100):
        set grads to g[t]; total = clip_grad_norm_(params, max_norm); opt.step(); sched.step()

Recorded per case (``<out>/<case>.safetensors`` + ``<out>/index.json``): init_<p>, grads_<p> (100 x numel),
after_<k>_<p> (the parameter after step k, k in 1, 2, 10, 50, 100), total_norm (100,), lr_<group>
(100,: the lr each step used). ``cases.json``: each case's optimizer, options, groups, clipping, schedule.

Usage (needs torch, safetensors; CPU, a second):
  CUDA_VISIBLE_DEVICES="" python3 tools/make_optim_reference.py --out tests/data/optim
"""

import argparse
import json
import math
import os
import sys

SHAPES = {"A": (4, 6), "B": (5, 4), "m": (5,)}
CHECKPOINTS = [1, 2, 10, 50, 100]
STEPS = 100
WARMUP = 10

CASES = [
    ("adamw_f32", "float32", "adamw", dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=False),
     1.0, True),
    ("adamw_f64", "float64", "adamw", dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=False),
     1.0, True),
    ("adamw_amsgrad_f32", "float32", "adamw",
     dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01, amsgrad=True), None, False),
    ("adamw_amsgrad_f64", "float64", "adamw",
     dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01, amsgrad=True), 0.5, True),
    ("sgd_nesterov_f32", "float32", "sgd", dict(lr=5e-2, momentum=0.9, dampening=0.0, weight_decay=1e-3,
                                                 nesterov=True), 1.0, True),
    ("sgd_nesterov_f64", "float64", "sgd", dict(lr=5e-2, momentum=0.9, dampening=0.0, weight_decay=1e-3,
                                                 nesterov=True), 1.0, True),
    ("sgd_dampening_f64", "float64", "sgd", dict(lr=1e-1, momentum=0.5, dampening=0.3, weight_decay=0.0,
                                                  nesterov=False), None, False),
    ("sgd_plain_f32", "float32", "sgd", dict(lr=1e-1, momentum=0.0, dampening=0.0, weight_decay=0.05,
                                              nesterov=False), 2.0, True),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import safetensors.torch
    import torch

    os.makedirs(args.out, exist_ok=True)
    meta = {"torch_version": torch.__version__, "steps": STEPS, "warmup": WARMUP, "checkpoints": CHECKPOINTS,
            "shapes": {k: list(v) for k, v in SHAPES.items()}, "cases": {}}
    for name, dtype_name, kind, opts, max_norm, schedule in CASES:
        dtype = getattr(torch, dtype_name)
        gen = torch.Generator().manual_seed(sum(map(ord, name)))
        params = {k: torch.randn(v, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
                  for k, v in SHAPES.items()}
        grads = {k: torch.randn((STEPS,) + v, generator=gen, dtype=torch.float64).to(dtype) for k, v in SHAPES.items()}
        # Some steps with large gradients, so that clipping acts on them.
        for k in grads:
            grads[k][5] *= 20
            grads[k][40] *= 50
        t = {f"init_{k}": p.detach().clone() for k, p in params.items()}
        for k in grads:
            t[f"grads_{k}"] = grads[k].reshape(STEPS, -1).clone()
        lr = opts["lr"]
        wd = opts["weight_decay"]
        groups = [{"params": [params["A"]], "lr": lr, "weight_decay": wd},
                  {"params": [params["B"]], "lr": 4 * lr, "weight_decay": wd},
                  {"params": [params["m"]], "lr": lr, "weight_decay": 0.0}]
        rest = {k: v for k, v in opts.items() if k not in ("lr", "weight_decay")}
        if kind == "adamw":
            opt = torch.optim.AdamW(groups, lr=lr, weight_decay=wd, foreach=False, **rest)
        else:
            opt = torch.optim.SGD(groups, lr=lr, weight_decay=wd, foreach=False, **rest)

        def factor(step):
            if step < WARMUP:
                return (step + 1) / WARMUP
            progress = (step - WARMUP) / (STEPS - WARMUP)
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor) if schedule else None
        norms = []
        lrs = {g: [] for g in ("A", "B", "m")}
        for step in range(STEPS):
            for k, p in params.items():
                p.grad = grads[k][step].clone()
            if max_norm is not None:
                norms.append(float(torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm, foreach=False)))
            for g, key in zip(opt.param_groups, ("A", "B", "m")):
                lrs[key].append(g["lr"])
            opt.step()
            if sched is not None:
                sched.step()
            if step + 1 in CHECKPOINTS:
                for k, p in params.items():
                    t[f"after_{step + 1}_{k}"] = p.detach().clone()
        if norms:
            t["total_norm"] = torch.tensor(norms, dtype=torch.float64)
        for key, v in lrs.items():
            t[f"lr_{key}"] = torch.tensor(v, dtype=torch.float64)
        safetensors.torch.save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(args.out, name + ".safetensors"))
        meta["cases"][name] = {"dtype": dtype_name, "optimizer": kind, "options": opts, "max_norm": max_norm,
                               "schedule": "linear warm-up 10 steps, cosine to 0 at 100 (LambdaLR)" if schedule else None,
                               "groups": [{"param": "A", "lr": lr, "weight_decay": wd},
                                          {"param": "B", "lr": 4 * lr, "weight_decay": wd},
                                          {"param": "m", "lr": lr, "weight_decay": 0.0}]}
        print(name, "final |A|", float(params["A"].detach().abs().max()))
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
