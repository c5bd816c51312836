#!/usr/bin/env python3
"""Make the reference data in tests/data/linear/ with real HuggingFace PEFT.

Each case builds a tiny torch module holding one nn.Linear named ``lin`` and wraps it with
``peft.get_peft_model(model, LoraConfig(...))`` (use_dora / use_rslora as the case says,
``init_lora_weights=False`` so that PEFT keeps the random, nonzero A and B that nn.Linear gives its
lora_A / lora_B at creation). For DoRA, PEFT therefore initialises the magnitude at adapter creation
from W + s B A with B != 0: that vector is saved as ``m_init``. The forward then uses
``m = m_init * (1 + 0.2 * randn)`` so that m differs from the row norm.

Saved per case (``<out>/<name>.safetensors`` + ``<out>/<name>.json``):
  W (d_out x d_in), A (r x d_in), B (d_out x r), bias (d_out, only with bias), x (n x d_in),
  dy (n x d_out), y = PEFT forward, grad_x / grad_A / grad_B (/ grad_m) = gradients of sum(y * dy)
  through PEFT's module with autograd (PEFT detaches the DoRA row norm), W_merged = PEFT's
  merge_and_unload() of a deep copy.
  DoRA only: m_init, m, row_norm (PEFT's get_weight_norm with the current A, B),
  y_exact, grad_x_exact, grad_A_exact, grad_B_exact, grad_m_exact: an independent pure-torch autograd
  computation of y = (x V^T) * (m / ||V||_rows) + bias, V = W + s B A, with the norm NOT detached.
Also <out>/index.json (the case names) and <out>/init_info.json (PEFT's own A/B initialisations,
quoted from its source).

Usage (needs torch and peft; runs on CPU in a few seconds):
  CUDA_VISIBLE_DEVICES="" python3 tools/make_reference.py --out tests/data/linear
"""

import argparse
import copy
import inspect
import json
import math
import os
import sys
import traceback

CONVENTION = (
    "W is d_out x d_in (torch Linear), A is r x d_in, B is d_out x r, x is n x d_in, "
    "y = x W'^T + bias; grads are of sum(y * dy)"
)

# name: (kind, d_out, d_in, r, alpha, n, bias, use_rslora, dtype, seed)
CASES = [
    ("dora_f64_bias", "dora", 16, 24, 4, 8, 5, True, False, "float64", 1),
    ("dora_f64_nobias_rslora", "dora", 12, 20, 4, 16, 6, False, True, "float64", 11),
    ("dora_f64_rank1", "dora", 10, 7, 1, 2, 3, True, False, "float64", 12),
    ("dora_f64_wide", "dora", 48, 96, 16, 32, 32, True, False, "float64", 13),
    ("dora_f32_bias", "dora", 32, 48, 8, 16, 8, True, False, "float32", 14),
    ("dora_f32_rslora_nobias_rank1", "dora", 20, 36, 1, 4, 4, False, True, "float32", 15),
    ("dora_f32_tall", "dora", 96, 40, 8, 8, 16, True, False, "float32", 16),
    ("lora_f64_bias", "lora", 16, 24, 4, 8, 5, True, False, "float64", 5),
    ("lora_f64_nobias_rslora", "lora", 12, 20, 4, 16, 6, False, True, "float64", 21),
    ("lora_f64_rank1", "lora", 10, 7, 1, 2, 3, True, False, "float64", 22),
    ("lora_f32_bias", "lora", 32, 48, 8, 16, 8, True, False, "float32", 23),
    ("lora_f32_rslora_nobias", "lora", 20, 36, 2, 4, 4, False, True, "float32", 24),
]

ADAPTER = "default"


def tolerances(torch, dtype):
    return (1e-11, 1e-12) if dtype == torch.float64 else (2e-5, 2e-6)  # (rtol, atol)


def check_close(torch, name, a, b, dtype):
    rtol, atol = tolerances(torch, dtype)
    diff = (a - b).abs().max().item()
    scale = b.abs().max().item()
    print(f"    check {name}: max|diff| = {diff:.3e} (max|ref| = {scale:.3e})")
    if not torch.allclose(a, b, rtol=rtol, atol=atol * max(1.0, scale)):
        raise AssertionError(f"{name}: max|diff| {diff:.3e} exceeds rtol={rtol} atol={atol}")


def make_case(torch, peft, out_dir, spec):
    from torch import nn
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    name, kind, d_out, d_in, r, alpha, n, bias, use_rslora, dtype_name, seed = spec
    dtype = getattr(torch, dtype_name)
    print(f"== {name}: {kind} d_out={d_out} d_in={d_in} r={r} alpha={alpha} n={n} bias={bias} "
          f"rslora={use_rslora} {dtype_name} seed={seed}")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(d_in, d_out, bias=bias)

        def forward(self, x):
            return self.lin(x)

    old_default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # every parameter (base and adapter) is born in this dtype
    try:
        torch.manual_seed(seed)
        base = Tiny()  # W, bias: nn.Linear's default init
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            use_dora=(kind == "dora"),
            use_rslora=use_rslora,
            target_modules=["lin"],
            lora_dropout=0.0,
            bias="none",
            # False: PEFT leaves lora_A / lora_B as nn.Linear initialised them (kaiming uniform, both
            # random and nonzero), so the DoRA magnitude PEFT computes at creation sees B != 0.
            init_lora_weights=False,
        )
        model = get_peft_model(base, config)
    finally:
        torch.set_default_dtype(old_default)

    layer = model.base_model.model.lin
    assert type(layer).__module__.startswith("peft."), type(layer)
    scaling = float(layer.scaling[ADAPTER])
    expect_s = alpha / math.sqrt(r) if use_rslora else alpha / r
    assert abs(scaling - expect_s) < 1e-12, (scaling, expect_s)

    base_lin = layer.get_base_layer()
    W = base_lin.weight.detach().clone()
    b = base_lin.bias.detach().clone() if bias else None
    A_p = layer.lora_A[ADAPTER].weight
    B_p = layer.lora_B[ADAPTER].weight
    A = A_p.detach().clone()
    B = B_p.detach().clone()
    for t, tn in ((W, "W"), (A, "A"), (B, "B")):
        assert t.dtype == dtype, (tn, t.dtype)
    assert B.abs().min().item() > 0.0, "B must be nonzero"

    gen = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64).to(dtype)
    dy = torch.randn(n, d_out, generator=gen, dtype=torch.float64).to(dtype)

    tensors = {"W": W, "A": A, "B": B, "x": x, "dy": dy}
    if bias:
        tensors["bias"] = b

    if kind == "dora":
        dora_layer = layer.lora_magnitude_vector[ADAPTER]
        m_init = dora_layer.weight.detach().clone()
        assert m_init.dtype == dtype, m_init.dtype
        # m_init must be PEFT's magnitude at creation, i.e. the row norms of W + s B A (B != 0).
        check_close(torch, "m_init == ||W + s B A||_rows", m_init,
                    torch.linalg.norm(W.double() + scaling * (B.double() @ A.double()), dim=1).to(dtype),
                    dtype)
        w_norm = torch.linalg.norm(W.double(), dim=1)
        print(f"    m_init vs ||W||_rows: max|diff| = {(m_init.double() - w_norm).abs().max().item():.3e}"
              " (nonzero: B != 0 at creation)")
        noise = torch.randn(d_out, generator=gen, dtype=torch.float64)
        m = (m_init.double() * (1.0 + 0.2 * noise)).to(dtype)
        with torch.no_grad():
            dora_layer.weight.copy_(m)
        tensors["m_init"] = m_init
        tensors["m"] = m.clone()
        with torch.no_grad():
            row_norm = dora_layer.get_weight_norm(W, (B @ A).detach(), scaling).detach().clone()
        assert row_norm.dtype == dtype, row_norm.dtype
        tensors["row_norm"] = row_norm

    # PEFT forward and backward of sum(y * dy)
    model.zero_grad(set_to_none=True)
    xv = x.clone().requires_grad_(True)
    y = model(xv)
    assert y.shape == (n, d_out) and y.dtype == dtype, (y.shape, y.dtype)
    (y * dy).sum().backward()
    tensors["y"] = y.detach().clone()
    tensors["grad_x"] = xv.grad.detach().clone()
    tensors["grad_A"] = A_p.grad.detach().clone()
    tensors["grad_B"] = B_p.grad.detach().clone()
    assert base_lin.weight.grad is None, "base weight must be frozen by PEFT"
    if kind == "dora":
        tensors["grad_m"] = layer.lora_magnitude_vector[ADAPTER].weight.grad.detach().clone()

    # PEFT merge on a deep copy
    merged_model = copy.deepcopy(model).merge_and_unload()
    W_merged = merged_model.lin.weight.detach().clone()
    assert type(merged_model.lin) is nn.Linear, type(merged_model.lin)
    tensors["W_merged"] = W_merged
    bias_t = b if bias else torch.zeros(d_out, dtype=dtype)
    with torch.no_grad():
        check_close(torch, "merged forward == PEFT y", x @ W_merged.T + bias_t, tensors["y"], dtype)

    if kind == "dora":
        # independent pure-torch autograd, norm NOT detached
        Ae = A.clone().requires_grad_(True)
        Be = B.clone().requires_grad_(True)
        me = m.clone().requires_grad_(True)
        xe = x.clone().requires_grad_(True)
        V = W + scaling * (Be @ Ae)
        nrm = torch.linalg.norm(V, dim=1)
        ye = (xe @ V.T) * (me / nrm) + bias_t
        (ye * dy).sum().backward()
        tensors["y_exact"] = ye.detach().clone()
        tensors["grad_x_exact"] = xe.grad.detach().clone()
        tensors["grad_A_exact"] = Ae.grad.detach().clone()
        tensors["grad_B_exact"] = Be.grad.detach().clone()
        tensors["grad_m_exact"] = me.grad.detach().clone()
        check_close(torch, "y_exact == PEFT y", tensors["y_exact"], tensors["y"], dtype)
        check_close(torch, "grad_m_exact == grad_m", tensors["grad_m_exact"], tensors["grad_m"], dtype)
        check_close(torch, "grad_x_exact == grad_x", tensors["grad_x_exact"], tensors["grad_x"], dtype)
        check_close(torch, "row_norm == ||V||_rows", tensors["row_norm"], nrm.detach(), dtype)
        gA_rel = ((tensors["grad_A_exact"] - tensors["grad_A"]).norm() / tensors["grad_A"].norm()).item()
        print(f"    grad_A exact vs detached: relative difference {gA_rel:.3e} (should be clearly > 0)")
        # the detached formulas of docs/math.md, as a cross-check
        with torch.no_grad():
            g = m / row_norm
            h = x @ W.T + scaling * (x @ A.T) @ B.T
            check_close(torch, "grad_m == sum_t dy*h / n", (dy * h).sum(0) / row_norm, tensors["grad_m"], dtype)
            Gg = dy * g
            check_close(torch, "grad_B == s Gg^T (x A^T)", scaling * Gg.T @ (x @ A.T), tensors["grad_B"], dtype)
    else:
        with torch.no_grad():
            y_ref = x @ W.T + scaling * (x @ A.T) @ B.T + bias_t
            check_close(torch, "PEFT y == x W^T + s (x A^T) B^T + b", tensors["y"], y_ref, dtype)
            check_close(torch, "W_merged == W + s B A", W_merged, W + scaling * (B @ A), dtype)

    for k, v in tensors.items():
        assert v.dtype == dtype, (k, v.dtype)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, name + ".safetensors"))
    meta = {
        "kind": kind,
        "d_in": d_in,
        "d_out": d_out,
        "r": r,
        "alpha": alpha,
        "n": n,
        "bias": bias,
        "use_rslora": use_rslora,
        "scaling": scaling,
        "dtype": dtype_name,
        "seed": seed,
        "convention": CONVENTION,
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
    }
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"    wrote {name}: {sorted(tensors)}")


def make_init_info(torch, peft, out_dir):
    from torch import nn
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import LoraLayer

    src = inspect.getsource(LoraLayer.reset_lora_parameters)
    lines = src.splitlines()
    quoted_true = [l.strip() for l in lines if "kaiming_uniform_" in l]
    quoted_gauss = [l.strip() for l in lines if "gaussian" in l or "normal_(self.lora_A" in l]
    quoted_b = [l.strip() for l in lines if "zeros_(self.lora_B" in l]

    extra_sources = {}
    for label, getter in (
        ("peft.tuners.lora.layer.LoraLayer.update_layer", lambda: LoraLayer.update_layer),
        ("peft.tuners.lora.variants.DoraLinearVariant.init",
         lambda: __import__("peft.tuners.lora.variants", fromlist=["x"]).DoraLinearVariant.init),
        ("peft.tuners.lora.dora.DoraLinearLayer.update_layer",
         lambda: __import__("peft.tuners.lora.dora", fromlist=["x"]).DoraLinearLayer.update_layer),
        ("peft.tuners.lora.dora.DoraLinearLayer.get_weight_norm",
         lambda: __import__("peft.tuners.lora.dora", fromlist=["x"]).DoraLinearLayer.get_weight_norm),
    ):
        try:
            extra_sources[label] = inspect.getsource(getter())
        except Exception as e:  # keep going: these are documentation only
            extra_sources[label] = f"<unavailable: {e!r}>"

    # empirical check of both inits on a wide layer
    d_in, d_out, r = 4096, 64, 8

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(d_in, d_out)

        def forward(self, x):
            return self.lin(x)

    empirical = {}
    for init in (True, "gaussian"):
        torch.manual_seed(0)
        mdl = get_peft_model(Tiny(), LoraConfig(r=r, lora_alpha=16, target_modules=["lin"],
                                                init_lora_weights=init))
        lay = mdl.base_model.model.lin
        A = lay.lora_A[ADAPTER].weight.detach().double()
        B = lay.lora_B[ADAPTER].weight.detach().double()
        empirical[str(init)] = {
            "d_in": d_in, "r": r,
            "A_min": A.min().item(), "A_max": A.max().item(), "A_std": A.std().item(),
            "A_mean": A.mean().item(), "B_max_abs": B.abs().max().item(),
        }
    bound = 1.0 / math.sqrt(d_in)
    e_true = empirical["True"]
    assert e_true["A_max"] <= bound and e_true["A_min"] >= -bound and e_true["A_max"] > 0.99 * bound, e_true
    assert abs(e_true["A_std"] - bound / math.sqrt(3)) < 0.02 * bound, e_true
    e_g = empirical["gaussian"]
    assert abs(e_g["A_std"] - 1.0 / r) < 0.02 / r, e_g
    assert e_true["B_max_abs"] == 0.0 and e_g["B_max_abs"] == 0.0

    info = {
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        "init_lora_weights=True": {
            "A": "torch.nn.init.kaiming_uniform_(A, a=sqrt(5)) on A of shape (r, d_in): fan_in = d_in",
            "A_distribution": "uniform(-bound, bound), bound = 1/sqrt(d_in)",
            "A_bound_derivation": "gain = sqrt(2 / (1 + a^2)) = sqrt(1/3); std = gain / sqrt(fan_in); "
                                  "bound = sqrt(3) * std = 1 / sqrt(d_in); so std(A) = 1 / sqrt(3 d_in)",
            "B": "zeros (d_out x r)",
            "quoted_source_lines": quoted_true + quoted_b,
        },
        "init_lora_weights=\"gaussian\"": {
            "A": "torch.nn.init.normal_(A, std=1/r): mean 0, std = 1/r (r = the adapter rank, not d_in)",
            "B": "zeros (d_out x r)",
            "quoted_source_lines": quoted_gauss + quoted_b,
        },
        "init_lora_weights=False": "LoraLayer.update_layer calls reset_lora_parameters only when "
                                   "init_lora_weights is truthy (and reset_lora_parameters skips the A/B init "
                                   "when it is False): lora_A / lora_B keep nn.Linear's default init "
                                   "(kaiming_uniform_ a=sqrt(5) on both: A bound 1/sqrt(d_in), B bound "
                                   "1/sqrt(r)); this is what tests/data/*.safetensors use",
        "dora_magnitude_init": "DoRA: after A/B init (and the move to the base layer's device/dtype), "
                               "PEFT sets the magnitude to the row norms ||W + s B A||_2 (dim=1); with B = 0 "
                               "that is ||W||_rows",
        "empirical_check": empirical,
        "source": {"peft.tuners.lora.layer.LoraLayer.reset_lora_parameters": src, **extra_sources},
    }
    with open(os.path.join(out_dir, "init_info.json"), "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    print("== init_info.json")
    print("  True:", quoted_true)
    print("  gaussian:", quoted_gauss)
    print("  B:", quoted_b)
    print("  empirical:", json.dumps(empirical))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join("tests", "data", "linear"), help="output directory (default tests/data/linear)")
    ap.add_argument("--only", nargs="*", help="make only these cases")
    args = ap.parse_args()

    import torch
    import peft

    torch.set_num_threads(1)  # reproducible reductions
    print(f"torch {torch.__version__}, peft {peft.__version__}, python {sys.version.split()[0]}")
    if peft.__version__ != "0.21.0":
        print(f"WARNING: expected peft 0.21.0, got {peft.__version__}")
    os.makedirs(args.out, exist_ok=True)

    failed = []
    names = []
    for spec in CASES:
        if args.only and spec[0] not in args.only:
            continue
        try:
            make_case(torch, peft, args.out, spec)
            names.append(spec[0])
        except Exception:
            traceback.print_exc()
            failed.append(spec[0])
    if not args.only:
        with open(os.path.join(args.out, "index.json"), "w") as f:
            json.dump(names, f, indent=1)
            f.write("\n")
        try:
            make_init_info(torch, peft, args.out)
        except Exception:
            traceback.print_exc()
            failed.append("init_info")
    if failed:
        print("FAILED:", failed)
        return 1
    print("all done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
