#!/usr/bin/env python3
"""Load adapter directories written by this project's C++ (tools/save_example_adapter) with real
PEFT and check that PEFT computes what C++ computed.

For each directory D (default: tests/data/peft/cpp_saved and tests/data/peft/cpp_saved_lora):
  - builds a torch model with one nn.Linear per <path>.weight of D/base_model.safetensors (bias when
    <path>.bias exists) at the same nested module paths, and loads those weights;
  - PeftModel.from_pretrained(model, D/adapter), eval mode;
  - for each x.<path> in D/io.safetensors: PEFT's forward of that module vs the C++ output y.<path>,
    relative error max|diff| / max|ref| <= 1e-5;
  - PEFT's merge_and_unload() vs the C++ merge (dora::io::merge_checkpoint) in
    D/merged_model.safetensors, relative error <= 1e-6 per tensor.
Embedding and Conv1d/2d/3d modules: when D/module.json exists (written by test_peft_adapter with
DORA_PEFT_LAYERS_OUT=DIR: one directory per tests/data/layers case, adapter written by
PeftAdapterWriter::add(path, layer)), the model is built from it instead: nn.Embedding(num_embeddings,
embedding_dim, padding_idx) or nn.Conv1d/2d/3d(in, out, kernel_size, stride, padding, dilation,
groups, bias) at its path, in its dtype, with D/base_model.safetensors loaded into it; the input is
x.<path> or ids.<path> (int64 token ids). Tolerances: relative 1e-12 for float64 outputs, 1e-5
(forward) / 1e-6 (merge) otherwise; the max abs difference is printed too.

A DIR argument that holds no adapter but subdirectories that do stands for those subdirectories
(e.g. tests/data/peft_layers/written).

Prints one line per check and exits non-zero if any fails. Its output is committed as
tests/data/peft/check_peft_load.txt (Linear) and tests/data/peft_layers/written/check_peft_load.txt
(Embedding and Conv).

Usage (needs torch, peft, safetensors):
  CUDA_VISIBLE_DEVICES="" python3 tools/check_peft_load.py [DIR ...]
"""

import copy
import json
import os
import sys

import torch
from torch import nn

import peft
from peft import PeftModel
from safetensors.torch import load_file

FWD_TOL = 1e-5
MERGE_TOL = 1e-6
F64_TOL = 1e-12


def tol_for(t, tol):
    return F64_TOL if t.dtype == torch.float64 else tol


def place(root, path, module):
    parent = root
    parts = path.split(".")
    for p in parts[:-1]:
        if not hasattr(parent, p):
            parent.add_module(p, nn.Module())
        parent = getattr(parent, p)
    parent.add_module(parts[-1], module)


def build_from_spec(spec, base_sd):
    """The torch module module.json describes (Embedding or ConvNd), at its path, with base_sd loaded."""
    dtype = {"float64": torch.float64, "float32": torch.float32}[spec["dtype"]]
    t = spec["type"]
    if t == "Embedding":
        m = nn.Embedding(spec["num_embeddings"], spec["embedding_dim"], padding_idx=spec["padding_idx"], dtype=dtype)
    else:
        cls = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}[t]
        m = cls(spec["in_channels"], spec["out_channels"], kernel_size=tuple(spec["kernel_size"]),
                stride=tuple(spec["stride"]), padding=tuple(spec["padding"]), dilation=tuple(spec["dilation"]),
                groups=spec["groups"], bias=spec["bias"], dtype=dtype)
    root = nn.Module()
    place(root, spec["path"], m)
    root.load_state_dict(base_sd, strict=True)
    return root


def build(base_sd):
    root = nn.Module()
    for key, w in base_sd.items():
        if not key.endswith(".weight") or w.dim() != 2:
            continue
        path = key[: -len(".weight")]
        parent = root
        parts = path.split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        parent.add_module(parts[-1], nn.Linear(w.shape[1], w.shape[0], bias=(path + ".bias") in base_sd, dtype=w.dtype))
    root.load_state_dict(base_sd, strict=True)
    return root


def rel(a, b):
    a, b = a.double(), b.double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale > 0 else (a - b).abs().max().item()


def maxabs(a, b):
    return (a.double() - b.double()).abs().max().item()


def check_dir(d):
    ok = True
    base_sd = load_file(f"{d}/base_model.safetensors")
    spec = None
    if os.path.exists(f"{d}/module.json"):
        with open(f"{d}/module.json") as f:
            spec = json.load(f)
        model = build_from_spec(spec, base_sd)
    else:
        model = build(base_sd)
    pm = PeftModel.from_pretrained(model, f"{d}/adapter")
    pm.eval()
    cfg = pm.peft_config["default"]
    print(f"{d}: PeftModel.from_pretrained OK: use_dora={cfg.use_dora} use_rslora={cfg.use_rslora} r={cfg.r} "
          f"lora_alpha={cfg.lora_alpha} rank_pattern={dict(cfg.rank_pattern)} alpha_pattern={dict(cfg.alpha_pattern)}")
    io = load_file(f"{d}/io.safetensors")
    with torch.no_grad():
        for key in sorted(io):
            if not key.startswith(("x.", "ids.")):
                continue
            path = key.split(".", 1)[1]
            layer = pm.base_model.model.get_submodule(path)
            y = layer(io[key])
            ref = io["y." + path]
            e = rel(y, ref)
            tol = tol_for(ref, FWD_TOL)
            good = e <= tol and y.shape == ref.shape
            ok &= good
            extra = ""
            if spec is not None:
                emb = "default" in getattr(layer, "lora_embedding_A", {})
                a = layer.lora_embedding_A["default"] if emb else layer.lora_A["default"].weight
                extra = (f" [{spec['type']} -> {type(layer).__module__}.{type(layer).__name__}, "
                         f"input {tuple(io[key].shape)}, y {tuple(y.shape)} {str(y.dtype)[6:]}, lora_A {str(a.dtype)[6:]}]")
            print(f"  forward {path}: r={layer.r['default']} scaling={layer.scaling['default']:.6g} "
                  f"dora={bool(layer.use_dora['default'])} rel err PEFT vs C++ = {e:.2e}, max abs diff "
                  f"{maxabs(y, ref):.2e} (tol {tol:g}){extra} {'OK' if good else 'FAIL'}")
    if not os.path.exists(f"{d}/merged_model.safetensors"):
        # A grouped convolution: dora refuses to merge it, and PEFT must refuse too.
        try:
            copy.deepcopy(pm).merge_and_unload()
            print("  merge: no C++ merge, but PEFT merged: FAIL")
            return False
        except NotImplementedError as e:
            print(f"  merge: refused by PEFT as by dora ({e}) OK")
        return ok
    merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    cpp_merged = load_file(f"{d}/merged_model.safetensors")
    for key in sorted(merged):
        e = rel(cpp_merged[key], merged[key])
        tol = tol_for(merged[key], MERGE_TOL)
        good = e <= tol and cpp_merged[key].shape == merged[key].shape
        ok &= good
        print(f"  merge {key}: rel err C++ merge vs PEFT merge_and_unload = {e:.2e}, max abs diff "
              f"{maxabs(cpp_merged[key], merged[key]):.2e} (tol {tol:g}) {'OK' if good else 'FAIL'}")
    return ok


def expand(dirs):
    """Each DIR, or its subdirectories that hold an adapter when DIR itself holds none."""
    out = []
    for d in dirs:
        if os.path.isdir(f"{d}/adapter") or not os.path.isdir(d):
            out.append(d)
            continue
        subs = sorted(s for s in os.listdir(d) if os.path.isdir(f"{d}/{s}/adapter"))
        if subs:
            out.extend(f"{d}/{s}" for s in subs)
        else:
            out.append(d)
    return out


def main():
    torch.set_num_threads(1)
    dirs = expand(sys.argv[1:] or ["tests/data/peft/cpp_saved", "tests/data/peft/cpp_saved_lora"])
    print(f"torch {torch.__version__}, peft {peft.__version__}")
    ok = all([check_dir(d) for d in dirs])
    print("ALL OK" if ok else "SOME CHECKS FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
