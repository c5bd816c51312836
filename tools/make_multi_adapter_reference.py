#!/usr/bin/env python3
"""Reference data for several adapters on one nn.Linear, made with real PEFT.

Each case builds a module with one base ``nn.Linear`` named ``layer`` and adds k named adapters to it
with ``get_peft_model`` / ``add_adapter`` (LoRA or DoRA each, own r, alpha, rsLoRA), every one created
with ``init_lora_weights=False`` (A and B random, nonzero) and ``lora_dropout=0``, under
``torch.set_default_dtype(dtype)`` after ``torch.manual_seed(seed)``. Each DoRA magnitude is PEFT's own
initialisation (the norm of W + s B A with the base W, per adapter) times (1 + 0.2 randn).

What is recorded, per case (``<out>/<name>.safetensors`` + ``<out>/<name>.json``):
  W (d_out, d_in), bias (d_out,), x (n, d_in), dy (n, d_out); per adapter k: A_k (r, d_in), B_k (d_out, r),
  m_k (d_out,) for DoRA.
  Stacked (``set_adapter([...])`` with the case's order, several active at once):
    y: PEFT's forward; grad_x, grad_A_k, grad_B_k, grad_m_k: autograd of sum(y * dy) through PEFT (its DoRA
    norm detached). PEFT 0.21's stacking rule (lora/layer.py Linear.forward, dora.py
    DoraLinearVariant.forward): result = base(x); then for each active adapter in order, LoRA adds
    s B A x; DoRA adds (g - 1) (result - bias) + g s B A x, g = m / ||W + s B A|| (row norms of the BASE W):
    a DoRA adapter rescales every contribution made before it (the base's and earlier adapters').
    y_exact, grad_*_exact: an independent float64 autograd of that same rule with the norm not detached.
  Merged: W_merged = merge_and_unload(adapter_names=order) of a deep copy: PEFT merges in that order, each
    DoRA adapter's norm taken from the weight as merged so far.
  Mixed batch (LoRA-only cases): y_mixed = model(x, adapter_names=[per row]) with "__base__" rows.
  json: the case's adapters (name, kind, r, alpha, use_rslora, scaling), order, row_adapters, checks, and
  what PEFT refused (e.g. adapter_names with DoRA; add_weighted_adapter on DoRA).

Usage (needs torch, peft, safetensors; CPU, seconds):
  CUDA_VISIBLE_DEVICES="" python3 tools/make_multi_adapter_reference.py --out tests/data/multi
"""

import argparse
import copy
import json
import math
import os
import sys

# name, dtype, d_out, d_in, n, bias, seed, adapters [(name, kind, r, alpha, rslora)], order, row_adapters
CASES = [
    ("lora_dora_f64", "float64", 6, 8, 5, True, 11,
     [("a", "lora", 4, 8, False), ("b", "dora", 2, 4, False)], ["a", "b"], None),
    ("dora_lora_f64", "float64", 6, 8, 5, True, 11,
     [("a", "lora", 4, 8, False), ("b", "dora", 2, 4, False)], ["b", "a"], None),
    ("dora_dora_f64", "float64", 7, 5, 4, True, 12,
     [("a", "dora", 3, 6, False), ("b", "dora", 2, 8, True)], ["a", "b"], None),
    ("three_mixed_f64", "float64", 6, 9, 5, False, 13,
     [("a", "dora", 3, 3, False), ("b", "lora", 2, 4, True), ("c", "dora", 4, 16, False)], ["a", "b", "c"], None),
    ("three_mixed_f32", "float32", 12, 16, 6, True, 14,
     [("a", "dora", 4, 8, False), ("b", "lora", 2, 4, False), ("c", "dora", 2, 2, True)], ["c", "a", "b"], None),
    ("mixed_batch_lora_f64", "float64", 6, 8, 6, True, 15,
     [("a", "lora", 4, 8, False), ("b", "lora", 2, 6, True)], ["a", "b"],
     ["a", "__base__", "b", "a", "b", "__base__"]),
    ("mixed_batch_lora_f32", "float32", 10, 12, 5, False, 16,
     [("a", "lora", 3, 6, False), ("b", "lora", 5, 5, False), ("c", "lora", 1, 2, True)], ["a", "b", "c"],
     ["c", "a", "__base__", "b", "c"]),
]


def scaling_of(alpha, r, rslora):
    return alpha / math.sqrt(r) if rslora else alpha / r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import peft
    import safetensors.torch
    import torch
    from peft import LoraConfig, get_peft_model

    os.makedirs(args.out, exist_ok=True)
    index = []
    for name, dtype_name, d_out, d_in, n, bias, seed, adapters, order, rows in CASES:
        print(f"case {name}")
        dtype = getattr(torch, dtype_name)
        torch.set_default_dtype(dtype)
        torch.manual_seed(seed)

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(d_in, d_out, bias=bias)

            def forward(self, x):
                return self.layer(x)

        net = Net()
        configs = {}
        model = None
        for a_name, kind, r, alpha, rslora in adapters:
            cfg = LoraConfig(r=r, lora_alpha=alpha, use_dora=(kind == "dora"), use_rslora=rslora,
                             target_modules=["layer"], lora_dropout=0.0, init_lora_weights=False)
            configs[a_name] = cfg
            if model is None:
                model = get_peft_model(net, cfg, adapter_name=a_name)
            else:
                model.add_adapter(a_name, cfg)
        layer = model.base_model.model.layer
        with torch.no_grad():
            for a_name, kind, r, alpha, rslora in adapters:
                if kind == "dora":
                    mv = layer.lora_magnitude_vector[a_name].weight
                    mv.mul_(1 + 0.2 * torch.randn_like(mv))
        x = torch.randn(n, d_in)
        dy = torch.randn(n, d_out)
        t = {"W": layer.base_layer.weight.detach().clone(), "x": x.clone(), "dy": dy.clone()}
        if bias:
            t["bias"] = layer.base_layer.bias.detach().clone()
        meta = {"peft_version": peft.__version__, "torch_version": torch.__version__, "dtype": dtype_name,
                "d_out": d_out, "d_in": d_in, "n": n, "bias": bias, "order": order, "adapters": [], "refused": {},
                "checks": {}}
        for a_name, kind, r, alpha, rslora in adapters:
            t[f"A_{a_name}"] = layer.lora_A[a_name].weight.detach().clone()
            t[f"B_{a_name}"] = layer.lora_B[a_name].weight.detach().clone()
            if kind == "dora":
                t[f"m_{a_name}"] = layer.lora_magnitude_vector[a_name].weight.detach().clone()
            meta["adapters"].append({"name": a_name, "kind": kind, "r": r, "alpha": alpha, "use_rslora": rslora,
                                     "scaling": layer.scaling[a_name]})
            assert abs(layer.scaling[a_name] - scaling_of(alpha, r, rslora)) < 1e-15

        # Stacked: several adapters active at once, in the case's order.
        model.base_model.set_adapter(order)
        assert list(layer.active_adapters) == order, (layer.active_adapters, order)
        model.train()
        xg = x.clone().requires_grad_(True)
        y = model(xg)
        (y * dy).sum().backward()
        t["y"] = y.detach().clone()
        t["grad_x"] = xg.grad.detach().clone()
        for a_name, kind, *_ in adapters:
            t[f"grad_A_{a_name}"] = layer.lora_A[a_name].weight.grad.detach().clone()
            t[f"grad_B_{a_name}"] = layer.lora_B[a_name].weight.grad.detach().clone()
            if kind == "dora":
                t[f"grad_m_{a_name}"] = layer.lora_magnitude_vector[a_name].weight.grad.detach().clone()

        # The same rule written out, float64, the DoRA norm not detached (the exact gradient).
        def stacked(W, b, xx, params, detach):
            result = xx @ W.T + (b if b is not None else 0)
            for a_name in order:
                kind, s = params[a_name]["kind"], params[a_name]["s"]
                A, B = params[a_name]["A"], params[a_name]["B"]
                lora = (xx @ A.T) @ B.T
                if kind == "lora":
                    result = result + s * lora
                else:
                    norm = (W + s * B @ A).norm(dim=1)
                    if detach:
                        norm = norm.detach()
                    g = params[a_name]["m"] / norm
                    base = result - (b if b is not None else 0)
                    result = result + (g - 1) * base + g * s * lora
            return result

        def leaf(v):
            return v.detach().double().clone().requires_grad_(True)

        params = {}
        for a_name, kind, r, alpha, rslora in adapters:
            params[a_name] = {"kind": kind, "s": layer.scaling[a_name], "A": leaf(t[f"A_{a_name}"]),
                              "B": leaf(t[f"B_{a_name}"])}
            if kind == "dora":
                params[a_name]["m"] = leaf(t[f"m_{a_name}"])
        W64 = t["W"].double()
        b64 = t["bias"].double() if bias else None
        x64 = leaf(x)
        y_det = stacked(W64, b64, x64.detach(), params, True)
        err = (y_det - t["y"].double()).abs().max().item()
        meta["checks"]["stacked rule vs PEFT forward"] = err
        print(f"  stacked rule vs PEFT forward: {err:.3e}")
        assert err < (1e-12 if dtype == torch.float64 else 1e-5), err
        y_ex = stacked(W64, b64, x64, params, False)
        (y_ex * dy.double()).sum().backward()
        t["y_exact"] = y_ex.detach().to(dtype)
        t["grad_x_exact"] = x64.grad.to(dtype)
        for a_name, kind, *_ in adapters:
            t[f"grad_A_{a_name}_exact"] = params[a_name]["A"].grad.to(dtype)
            t[f"grad_B_{a_name}_exact"] = params[a_name]["B"].grad.to(dtype)
            if kind == "dora":
                t[f"grad_m_{a_name}_exact"] = params[a_name]["m"].grad.to(dtype)
        # The detached rule's gradients equal PEFT's (the rule is what PEFT computes).
        for p in params.values():
            for v in p.values():
                if isinstance(v, torch.Tensor):
                    v.grad = None
        x64.grad = None
        (stacked(W64, b64, x64, params, True) * dy.double()).sum().backward()
        err = max((params[a]["A"].grad - t[f"grad_A_{a}"].double()).abs().max().item() for a in order)
        meta["checks"]["stacked rule's detached grad_A vs PEFT"] = err
        print(f"  detached grad_A vs PEFT: {err:.3e}")
        assert err < (1e-10 if dtype == torch.float64 else 1e-4), err

        # Merge in order (on a deep copy).
        merged = copy.deepcopy(model)
        try:
            unloaded = merged.merge_and_unload(adapter_names=order)
            t["W_merged"] = unloaded.layer.weight.detach().clone()
            # The rule written out: in order, LoRA adds its delta; DoRA adds its delta and scales the rows
            # by m / ||W + delta||, the norm taken from the UNMERGED base W (PEFT 0.21, huggingface/peft#3609:
            # so the merged layer equals the stacked forward). The norm of the weight merged so far (PEFT
            # before that fix) is recorded as well, to show by how much the two differ.
            for label, from_base in (("base-W norms", True), ("merged-so-far norms (pre-#3609)", False)):
                Wm = W64.clone()
                with torch.no_grad():
                    for a_name in order:
                        p = params[a_name]
                        delta = p["s"] * p["B"].detach() @ p["A"].detach()
                        if p["kind"] == "lora":
                            Wm = Wm + delta
                        else:
                            norm = ((W64 if from_base else Wm) + delta).norm(dim=1)
                            Wm = (p["m"].detach() / norm)[:, None] * (Wm + delta)
                err = (Wm - t["W_merged"].double()).abs().max().item()
                meta["checks"][f"sequential merge rule with {label} vs PEFT merge_and_unload"] = err
                print(f"  sequential merge rule with {label} vs PEFT: {err:.3e}")
                if from_base:
                    assert err < (1e-12 if dtype == torch.float64 else 1e-5), err
            # And the merged layer is the stacked forward (bias added once).
            y_merged = x.double() @ t["W_merged"].double().T + (b64 if b64 is not None else 0)
            err = (y_merged - t["y"].double()).abs().max().item()
            meta["checks"]["merged layer's output vs the stacked forward"] = err
            print(f"  merged layer vs stacked forward: {err:.3e}")
        except Exception as e:  # noqa: BLE001
            meta["refused"]["merge_and_unload"] = f"{type(e).__name__}: {e}"

        # Mixed batch: each row names its adapter.
        model.eval()
        if rows is not None:
            with torch.no_grad():
                t["y_mixed"] = model(x, adapter_names=rows).detach().clone()
            meta["row_adapters"] = rows
        elif any(k == "dora" for _, k, *_ in adapters):
            try:
                with torch.no_grad():
                    model(x, adapter_names=[order[i % len(order)] for i in range(n)])
                meta["refused"]["adapter_names"] = None
            except Exception as e:  # noqa: BLE001
                meta["refused"]["adapter_names"] = f"{type(e).__name__}: {e}"

        # add_weighted_adapter: cat (exact for LoRA) on two adapters of the case.
        pair = order[:2]
        try:
            model.add_weighted_adapter(pair, [1.0, 1.0], adapter_name="cat", combination_type="cat")
            t["A_cat"] = layer.lora_A["cat"].weight.detach().clone()
            t["B_cat"] = layer.lora_B["cat"].weight.detach().clone()
            meta["cat"] = {"adapters": pair, "weights": [1.0, 1.0], "scaling": layer.scaling["cat"],
                           "r": layer.r["cat"]}
            if "cat" in getattr(layer, "lora_magnitude_vector", {}):
                t["m_cat"] = layer.lora_magnitude_vector["cat"].weight.detach().clone()
        except Exception as e:  # noqa: BLE001
            meta["refused"]["add_weighted_adapter_cat"] = f"{type(e).__name__}: {e}"

        safetensors.torch.save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(args.out, name + ".safetensors"))
        with open(os.path.join(args.out, name + ".json"), "w") as f:
            json.dump(meta, f, indent=1)
        index.append(name)
        print(f"  refused: {meta['refused']}")
    with open(os.path.join(args.out, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
