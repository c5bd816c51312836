#!/usr/bin/env python3
"""Reference data for the bf16 compute backend (tests/backends/dnnl.cpp), made with real PEFT.

Each case is one nn.Linear whose weight is rounded to bf16 first (so W is exactly a bf16 tensor, as
a layer storing W in bf16 sees it), wrapped by peft.get_peft_model with use_dora=True,
init_lora_weights=False (A, B random and nonzero), m perturbed as in tools/make_reference.py. Saved
(<out>/<name>.safetensors + .json):
  W (BF16), bias (if any), A, B, m, x, dy (float32);
  y, grad_x, grad_A, grad_B, grad_m: PEFT in float32, autograd of sum(y * dy) (PEFT detaches the norm);
  *_exact: a pure-torch float64 autograd of y = (x V^T) * (m / ||V||_rows) + bias, V = W + s B A, the
    norm not detached, from the same values;
  *_peft_bf16: PEFT's own bf16 run (copy.deepcopy(model).to(torch.bfloat16), x and dy in bf16),
    stored as float32: how far PEFT's bf16 is from its float32, next to this project's bf16 path.

Usage: CUDA_VISIBLE_DEVICES="" python3 tools/make_bf16_reference.py --out tests/data/bf16
"""
import argparse
import copy
import json
import os

import torch
from torch import nn
import peft
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

# name: (d_out, d_in, r, alpha, n, bias, use_rslora, seed)
CASES = [
    ("dora_bf16w_bias", 96, 128, 8, 16, 40, True, False, 31),
    ("dora_bf16w_nobias_rslora", 70, 301, 5, 10, 33, False, True, 32),
    ("dora_bf16w_tall_n3", 256, 64, 16, 32, 3, True, False, 33),
]


class Block(nn.Module):
    def __init__(self, d_in, d_out, bias):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x):
        return self.lin(x)


def grads(model, x, dy):
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * dy).sum().backward()
    lin = model.base_model.model.lin
    return {"y": y.detach(), "grad_x": x.grad, "grad_A": lin.lora_A["default"].weight.grad,
            "grad_B": lin.lora_B["default"].weight.grad,
            "grad_m": lin.lora_magnitude_vector["default"].weight.grad}


def make_case(out, spec):
    name, d_out, d_in, r, alpha, n, bias, rslora, seed = spec
    torch.manual_seed(seed)
    model = Block(d_in, d_out, bias)
    with torch.no_grad():
        model.lin.weight.copy_(model.lin.weight.to(torch.bfloat16).float())
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0, use_dora=True,
                        use_rslora=rslora, init_lora_weights=False)
    model = get_peft_model(model, config)
    lin = model.base_model.model.lin
    with torch.no_grad():
        mag = lin.lora_magnitude_vector["default"].weight
        mag.mul_(1 + 0.2 * torch.randn(mag.shape))
    gen = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, d_in, generator=gen)
    dy = torch.randn(n, d_out, generator=gen)
    W = lin.base_layer.weight.detach()
    A = lin.lora_A["default"].weight.detach()
    B = lin.lora_B["default"].weight.detach()
    m = lin.lora_magnitude_vector["default"].weight.detach()
    b = lin.base_layer.bias.detach() if bias else None
    s = lin.scaling["default"]
    ref = grads(model, x, dy)

    # Exact (norm not detached), float64, pure torch.
    Wd, Ad, Bd, md = (t.double().clone().requires_grad_(True) for t in (W, A, B, m))
    Ad.retain_grad()
    xd = x.double().requires_grad_(True)
    V = Wd.detach() + s * Bd @ Ad
    y = (xd @ V.T) * (md / V.norm(dim=1))
    if b is not None:
        y = y + b.double()
    (y * dy.double()).sum().backward()
    exact = {"y_exact": y.detach(), "grad_x_exact": xd.grad, "grad_A_exact": Ad.grad, "grad_B_exact": Bd.grad,
             "grad_m_exact": md.grad}

    mb = copy.deepcopy(model).to(torch.bfloat16)
    pb = grads(mb, x.to(torch.bfloat16), dy.to(torch.bfloat16))

    tensors = {"W": W.to(torch.bfloat16).contiguous(), "A": A, "B": B, "m": m, "x": x, "dy": dy}
    if b is not None:
        tensors["bias"] = b
    tensors.update({k: v.float() for k, v in ref.items()})
    tensors.update({k: v.float() for k, v in exact.items()})
    tensors.update({k + "_peft_bf16": v.float() for k, v in pb.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, name + ".safetensors"))
    meta = {"name": name, "d_out": d_out, "d_in": d_in, "r": r, "alpha": alpha, "n": n, "bias": bias,
            "use_rslora": rslora, "scaling": s, "seed": seed, "peft_version": peft.__version__,
            "torch_version": torch.__version__}
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(meta, f, indent=1)
    err = (pb["y"].float() - ref["y"]).abs().max().item() / ref["y"].abs().max().item()
    print(f"{name}: PEFT bf16 y vs PEFT float32: {err:.2e} relative")
    return name


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    names = [make_case(args.out, c) for c in CASES]
    with open(os.path.join(args.out, "index.json"), "w") as f:
        json.dump(names, f, indent=1)


if __name__ == "__main__":
    main()
