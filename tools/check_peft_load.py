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
Prints one line per check and exits non-zero if any fails. Its output is committed as
tests/data/peft/check_peft_load.txt.

Usage (needs torch, peft, safetensors):
  CUDA_VISIBLE_DEVICES="" python3 tools/check_peft_load.py [DIR ...]
"""

import copy
import sys

import torch
from torch import nn

import peft
from peft import PeftModel
from safetensors.torch import load_file

FWD_TOL = 1e-5
MERGE_TOL = 1e-6


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


def check_dir(d):
    ok = True
    base_sd = load_file(f"{d}/base_model.safetensors")
    model = build(base_sd)
    pm = PeftModel.from_pretrained(model, f"{d}/adapter")
    pm.eval()
    cfg = pm.peft_config["default"]
    print(f"{d}: PeftModel.from_pretrained OK: use_dora={cfg.use_dora} use_rslora={cfg.use_rslora} r={cfg.r} "
          f"lora_alpha={cfg.lora_alpha} rank_pattern={dict(cfg.rank_pattern)} alpha_pattern={dict(cfg.alpha_pattern)}")
    io = load_file(f"{d}/io.safetensors")
    with torch.no_grad():
        for key in sorted(io):
            if not key.startswith("x."):
                continue
            path = key[2:]
            layer = pm.base_model.model.get_submodule(path)
            y = layer(io[key])
            e = rel(y, io["y." + path])
            good = e <= FWD_TOL
            ok &= good
            print(f"  forward {path}: r={layer.r['default']} scaling={layer.scaling['default']:.6g} "
                  f"dora={bool(layer.use_dora['default'])} rel err PEFT vs C++ = {e:.2e} "
                  f"(tol {FWD_TOL:g}) {'OK' if good else 'FAIL'}")
    merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    cpp_merged = load_file(f"{d}/merged_model.safetensors")
    for key in sorted(merged):
        e = rel(cpp_merged[key], merged[key])
        good = e <= MERGE_TOL
        ok &= good
        print(f"  merge {key}: rel err C++ merge vs PEFT merge_and_unload = {e:.2e} (tol {MERGE_TOL:g}) "
              f"{'OK' if good else 'FAIL'}")
    return ok


def main():
    torch.set_num_threads(1)
    dirs = sys.argv[1:] or ["tests/data/peft/cpp_saved", "tests/data/peft/cpp_saved_lora"]
    print(f"torch {torch.__version__}, peft {peft.__version__}")
    ok = all([check_dir(d) for d in dirs])
    print("ALL OK" if ok else "SOME CHECKS FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
