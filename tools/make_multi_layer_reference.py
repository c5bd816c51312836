#!/usr/bin/env python3
"""Reference data for several adapters on a Conv / Embedding layer, and for merging several saved adapters
into a checkpoint, made with real PEFT 0.21.

Layer cases (``<out>/<name>.safetensors`` + ``<out>/<name>.json``), the conventions of
tools/make_layer_reference.py (PEFT's layouts) and of tools/make_multi_adapter_reference.py (several named
adapters, ``init_lora_weights=False``, DoRA magnitudes PEFT's initialisation times (1 + 0.2 randn), no
dropout):
  conv: W (out, in, k...), bias (out,), x (N, in, spatial...), dy; per adapter A_k (r, in, k...), B_k
        (out, r, 1...), m_k (out,) (flattened from PEFT's (1, out, 1...));
  embedding: W (num, dim), ids (n,) int64, dy; A_k = lora_embedding_A (r, num), B_k (dim, r), m_k (dim,).
  y, grad_x (conv), grad_A_k, grad_B_k, grad_m_k: PEFT's stacked forward (set_adapter(order)) and autograd of
  sum(y * dy) (PEFT detaches the DoRA norms); W_merged: merge_and_unload(adapter_names=order).

Checkpoint case ``<out>/checkpoint/``: a model with Linear q (bias), Linear v (no bias), Embedding emb and
Conv2d conv, three adapters added in this order: "default" (DoRA, all four modules), "second" (LoRA, q and
emb), "third" (DoRA, rsLoRA, q, v and conv). Files:
  base.safetensors      the base model's state_dict before wrapping (float32)
  adapters/             PeftModel.save_pretrained: "default" in adapters/, the others in adapters/second/
                        and adapters/third/ (PEFT's layout for non-default adapters)
  merged.safetensors    merge_and_unload(adapter_names=["default", "second", "third"]).state_dict()
  merged_default_third.safetensors   the same with adapter_names=["default", "third"]
  meta.json             versions and what was merged

Usage (needs torch, peft, safetensors; CPU, seconds):
  CUDA_VISIBLE_DEVICES="" python3 tools/make_multi_layer_reference.py --out tests/data/multi_layers
"""

import argparse
import copy
import json
import os
import sys

# name, type, dtype, seed, geometry, adapters [(name, kind, r, alpha, rslora)], order
CASES = [
    ("conv2d_three_f64", "conv2d", "float64", 21,
     dict(cin=3, cout=5, k=(3, 3), stride=(1, 1), pad=(1, 1), bias=True, spatial=(5, 6), batch=2),
     [("a", "dora", 4, 8, False), ("b", "lora", 2, 4, False), ("c", "dora", 2, 2, True)], ["a", "b", "c"]),
    ("conv1d_lora_dora_f32", "conv1d", "float32", 22,
     dict(cin=4, cout=6, k=(3,), stride=(2,), pad=(1,), bias=False, spatial=(11,), batch=3),
     [("a", "dora", 4, 8, False), ("b", "lora", 2, 4, True)], ["b", "a"]),
    ("embedding_dora_lora_f64", "embedding", "float64", 23, dict(num=20, dim=12, n=9, pad=None),
     [("a", "dora", 4, 8, False), ("b", "lora", 2, 6, False), ("c", "dora", 3, 3, True)], ["c", "b", "a"]),
    ("embedding_two_dora_f32", "embedding", "float32", 24, dict(num=24, dim=16, n=10, pad=3),
     [("a", "dora", 4, 8, False), ("b", "dora", 2, 4, False)], ["a", "b"]),
]


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
    for name, ltype, dtype_name, seed, geo, adapters, order in CASES:
        print(f"case {name}")
        dtype = getattr(torch, dtype_name)
        torch.set_default_dtype(dtype)
        torch.manual_seed(seed)

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                if ltype == "embedding":
                    self.layer = torch.nn.Embedding(geo["num"], geo["dim"], padding_idx=geo["pad"])
                else:
                    conv = torch.nn.Conv2d if ltype == "conv2d" else torch.nn.Conv1d
                    self.layer = conv(geo["cin"], geo["cout"], geo["k"], stride=geo["stride"], padding=geo["pad"],
                                      bias=geo["bias"])

            def forward(self, x):
                return self.layer(x)

        net = Net()
        model = None
        for a_name, kind, r, alpha, rslora in adapters:
            cfg = LoraConfig(r=r, lora_alpha=alpha, use_dora=(kind == "dora"), use_rslora=rslora,
                             target_modules=["layer"], lora_dropout=0.0, init_lora_weights=False)
            if model is None:
                model = get_peft_model(net, cfg, adapter_name=a_name)
            else:
                model.add_adapter(a_name, cfg)
        layer = model.base_model.model.layer
        emb = ltype == "embedding"
        with torch.no_grad():
            for a_name, kind, *_ in adapters:
                if kind == "dora":
                    mv = layer.lora_magnitude_vector[a_name].weight
                    mv.mul_(1 + 0.2 * torch.randn_like(mv))
        if emb:
            x = torch.randint(0, geo["num"], (geo["n"],))
            if geo["pad"] is not None:
                x[1] = geo["pad"]
        else:
            x = torch.randn((geo["batch"], geo["cin"]) + tuple(geo["spatial"]))
        with torch.no_grad():
            y0 = layer.base_layer(x)
        dy = torch.randn_like(y0)
        t = {"W": layer.base_layer.weight.detach().clone(), "dy": dy.clone()}
        t["ids" if emb else "x"] = x.clone()
        if not emb and geo["bias"]:
            t["bias"] = layer.base_layer.bias.detach().clone()
        meta = {"peft_version": peft.__version__, "torch_version": torch.__version__, "dtype": dtype_name,
                "type": ltype, "geometry": geo, "order": order, "adapters": [], "refused": {}}
        for a_name, kind, r, alpha, rslora in adapters:
            if emb:
                t[f"A_{a_name}"] = layer.lora_embedding_A[a_name].detach().clone()
                t[f"B_{a_name}"] = layer.lora_embedding_B[a_name].detach().clone()
            else:
                t[f"A_{a_name}"] = layer.lora_A[a_name].weight.detach().clone()
                t[f"B_{a_name}"] = layer.lora_B[a_name].weight.detach().clone()
            if kind == "dora":
                t[f"m_{a_name}"] = layer.lora_magnitude_vector[a_name].weight.detach().reshape(-1).clone()
            meta["adapters"].append({"name": a_name, "kind": kind, "r": r, "alpha": alpha, "use_rslora": rslora,
                                     "scaling": layer.scaling[a_name]})
        model.base_model.set_adapter(order)
        assert list(layer.active_adapters) == order, (layer.active_adapters, order)
        model.train()
        xin = x if emb else x.clone().requires_grad_(True)
        y = model(xin)
        (y * dy).sum().backward()
        t["y"] = y.detach().clone()
        if not emb:
            t["grad_x"] = xin.grad.detach().clone()
        for a_name, kind, *_ in adapters:
            if emb:
                t[f"grad_A_{a_name}"] = layer.lora_embedding_A[a_name].grad.detach().clone()
                t[f"grad_B_{a_name}"] = layer.lora_embedding_B[a_name].grad.detach().clone()
            else:
                t[f"grad_A_{a_name}"] = layer.lora_A[a_name].weight.grad.detach().clone()
                t[f"grad_B_{a_name}"] = layer.lora_B[a_name].weight.grad.detach().clone()
            if kind == "dora":
                t[f"grad_m_{a_name}"] = layer.lora_magnitude_vector[a_name].weight.grad.detach().reshape(-1).clone()
        try:
            unloaded = copy.deepcopy(model).merge_and_unload(adapter_names=order)
            t["W_merged"] = unloaded.layer.weight.detach().clone()
            with torch.no_grad():
                y_m = unloaded(x)
            err = (y_m.double() - t["y"].double()).abs().max().item()
            meta["merged layer vs stacked forward"] = err
            print(f"  merged layer vs stacked forward: {err:.3e}")
        except Exception as e:  # noqa: BLE001
            meta["refused"]["merge_and_unload"] = f"{type(e).__name__}: {e}"
        safetensors.torch.save_file({k: v.contiguous() for k, v in t.items()},
                                    os.path.join(args.out, name + ".safetensors"))
        with open(os.path.join(args.out, name + ".json"), "w") as f:
            json.dump(meta, f, indent=1)
        index.append(name)
    with open(os.path.join(args.out, "index.json"), "w") as f:
        json.dump(index, f, indent=1)

    # The checkpoint case.
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(31)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(30, 16)
            self.q = torch.nn.Linear(16, 12)
            self.v = torch.nn.Linear(12, 16, bias=False)
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.norm = torch.nn.LayerNorm(16)

        def forward(self, ids):
            return self.v(self.q(self.emb(ids)))

    base = Model()
    out = os.path.join(args.out, "checkpoint")
    os.makedirs(out, exist_ok=True)
    base_sd = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}
    safetensors.torch.save_file(base_sd, os.path.join(out, "base.safetensors"), metadata={"format": "pt"})
    specs = [("default", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q", "v", "emb", "conv"])),
             ("second", dict(r=2, lora_alpha=4, use_dora=False, target_modules=["q", "emb"])),
             ("third", dict(r=2, lora_alpha=3, use_dora=True, use_rslora=True, target_modules=["q", "v", "conv"]))]
    pm = None
    for a_name, kw in specs:
        cfg = LoraConfig(init_lora_weights=False, lora_dropout=0.0, **kw)
        if pm is None:
            pm = get_peft_model(base, cfg, adapter_name=a_name)
        else:
            pm.add_adapter(a_name, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    pm.save_pretrained(os.path.join(out, "adapters"))
    layout = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    print("  saved:", layout)
    cmeta = {"peft_version": peft.__version__, "torch_version": torch.__version__, "adapters": dict(specs),
             "merges": {}}
    for label, names in (("merged", ["default", "second", "third"]), ("merged_default_third", ["default", "third"])):
        unloaded = copy.deepcopy(pm).merge_and_unload(adapter_names=names)
        sd = {k: v.detach().clone().contiguous() for k, v in unloaded.state_dict().items()}
        safetensors.torch.save_file(sd, os.path.join(out, label + ".safetensors"), metadata={"format": "pt"})
        cmeta["merges"][label] = names
    cmeta["files"] = layout
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(cmeta, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
