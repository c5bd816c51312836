#!/usr/bin/env python3
"""Make the PEFT adapter fixtures in tests/data/peft/<case>/ with real HuggingFace PEFT.

Each case builds a small model with four non-square nn.Linear layers at nested paths
(q_proj 32->24 without bias, v_proj 32->16, mlp.fc1 32->48, mlp.fc2 48->32) plus a LayerNorm
(a tensor that is not adapted and must be copied), wraps it with
``peft.get_peft_model(model, LoraConfig(..., init_lora_weights=False))`` so that A and B are random
and nonzero, perturbs each DoRA magnitude (m *= 1 + 0.2 randn, so m differs from the row norm), and
writes:

  adapter/                   PeftModel.save_pretrained (adapter_config.json, adapter_model.safetensors)
  base_model.safetensors     the base model's state_dict before wrapping (keys <path>.weight, ...)
  merged_model.safetensors   copy.deepcopy(peft_model).merge_and_unload().state_dict()
  io.safetensors             x.<path> and y.<path> = the PEFT-wrapped module's eval forward on x;
                             bf16 cases also y64.<path>: the same adapter upcast to float64
  merged_f64.safetensors     bf16 cases only: merge_and_unload of the model upcast to float64 (the
                             exact merge of the stored bf16 values, to check rounding)
  meta.json                  per module: r, lora_alpha, scaling, use_dora as PEFT's live layer holds
                             them (layer.r / lora_alpha / scaling["default"]), shapes; versions
and tests/data/peft/cases.json (the case names).

Usage (needs torch, peft, safetensors; CPU, a few seconds):
  CUDA_VISIBLE_DEVICES="" python3 tools/make_peft_fixtures.py --out tests/data/peft [--only CASE ...]
"""

import argparse
import copy
import json
import os
import shutil

import torch
from torch import nn

import peft
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

ADAPTER = "default"
MODULES = ["q_proj", "v_proj", "mlp.fc1", "mlp.fc2"]

CASES = [
    # DoRA float32 with a rank_pattern and an alpha_pattern (nested path key).
    dict(name="dora_f32", dtype="float32", use_dora=True, r=4, lora_alpha=8, use_rslora=False,
         rank_pattern={"fc1": 6}, alpha_pattern={"mlp.fc2": 3}, target_modules=["q_proj", "v_proj", "fc1", "fc2"], seed=1),
    # LoRA float32, rsLoRA, target_modules as a regular expression, rank_pattern.
    dict(name="lora_f32_rslora", dtype="float32", use_dora=False, r=4, lora_alpha=6, use_rslora=True,
         rank_pattern={"q_proj": 2}, alpha_pattern={}, target_modules=r".*(q_proj|v_proj|fc1|fc2)", seed=2),
    # DoRA bfloat16 (model in bf16), rsLoRA, rank_pattern and a regex alpha_pattern.
    dict(name="dora_bf16_rslora", dtype="bfloat16", use_dora=True, r=8, lora_alpha=16, use_rslora=True,
         rank_pattern={"v_proj": 2}, alpha_pattern={"fc.*": 4}, target_modules=["q_proj", "v_proj", "fc1", "fc2"], seed=3),
    # LoRA bfloat16.
    dict(name="lora_bf16", dtype="bfloat16", use_dora=False, r=4, lora_alpha=8, use_rslora=False,
         rank_pattern={}, alpha_pattern={}, target_modules=["q_proj", "v_proj", "fc1", "fc2"], seed=4),
]

# Adapters stored in bfloat16 (get_peft_model(..., autocast_adapter_dtype=False) on a bf16 model):
# PEFT's merge_and_unload then computes in bf16, rounding after every step, where the cases above
# (adapter weights upcast to float32 by PEFT's default) merge in float32 and round once.
# Listed in cases_bf16_adapter.json, not cases.json: their merges differ from PEFT's on purpose
# (tests/parity/linear.cpp, docs/peft_interop.md).
CASES_BF16_ADAPTER = [
    dict(name="dora_bf16_adapter_bf16", dtype="bfloat16", use_dora=True, r=8, lora_alpha=16, use_rslora=False,
         rank_pattern={}, alpha_pattern={}, target_modules=["q_proj", "v_proj", "fc1", "fc2"], seed=5,
         adapter_dtype="bfloat16"),
    dict(name="lora_bf16_adapter_bf16", dtype="bfloat16", use_dora=False, r=8, lora_alpha=16, use_rslora=False,
         rank_pattern={}, alpha_pattern={}, target_modules=["q_proj", "v_proj", "fc1", "fc2"], seed=6,
         adapter_dtype="bfloat16"),
]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(32, 24, bias=False)
        self.v_proj = nn.Linear(32, 16)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(32, 48)
        self.mlp.fc2 = nn.Linear(48, 32)
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        h = self.norm(x)
        return self.mlp.fc2(torch.relu(self.mlp.fc1(h))) + torch.cat([self.q_proj(h), self.v_proj(h)], dim=-1)[..., :32]


def contiguous(sd):
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def make_case(out_root, spec):
    name = spec["name"]
    dtype = getattr(torch, spec["dtype"])
    out = os.path.join(out_root, name)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    torch.manual_seed(spec["seed"])
    model = Block()
    with torch.no_grad():  # a LayerNorm that is not the identity, so copying it is visible
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.1, 0.1)
    model = model.to(dtype)
    base_sd = contiguous(model.state_dict())
    config = LoraConfig(r=spec["r"], lora_alpha=spec["lora_alpha"], use_rslora=spec["use_rslora"],
                        use_dora=spec["use_dora"], rank_pattern=spec["rank_pattern"], alpha_pattern=spec["alpha_pattern"],
                        target_modules=spec["target_modules"], lora_dropout=0.0, init_lora_weights=False)
    bf16_adapter = spec.get("adapter_dtype") == "bfloat16"
    pm = get_peft_model(model, config, autocast_adapter_dtype=not bf16_adapter)
    if bf16_adapter:
        assert all(p.dtype == torch.bfloat16 for n, p in pm.named_parameters() if "lora_" in n), "adapter not bf16"
    gen = torch.Generator().manual_seed(1000 + spec["seed"])
    meta = {"case": name, "dtype": spec["dtype"], "peft_version": peft.__version__, "torch_version": torch.__version__,
            "config": {k: spec[k] for k in ("r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
                                            "target_modules")},
            "modules": {}}
    with torch.no_grad():
        for path in MODULES:
            layer = pm.base_model.model.get_submodule(path)
            if spec["use_dora"]:
                mv = layer.lora_magnitude_vector[ADAPTER].weight
                mv.mul_((1 + 0.2 * torch.randn(mv.shape, generator=gen)).to(mv.dtype))
            meta["modules"][path] = {
                "r": layer.r[ADAPTER], "lora_alpha": layer.lora_alpha[ADAPTER], "scaling": layer.scaling[ADAPTER],
                "use_dora": bool(layer.use_dora[ADAPTER]), "d_out": layer.out_features, "d_in": layer.in_features,
                "lora_A_dtype": str(layer.lora_A[ADAPTER].weight.dtype)}
    pm.eval()
    pm.save_pretrained(os.path.join(out, "adapter"))
    readme = os.path.join(out, "adapter", "README.md")
    if os.path.exists(readme):
        os.remove(readme)  # a generated model card, not needed by the tests
    save_file(base_sd, os.path.join(out, "base_model.safetensors"), metadata={"format": "pt"})

    io = {}
    pm64 = copy.deepcopy(pm).to(torch.float64) if dtype != torch.float32 else None
    with torch.no_grad():
        for path in MODULES:
            layer = pm.base_model.model.get_submodule(path)
            x = torch.randn(5, layer.in_features, generator=gen).to(dtype)
            io["x." + path] = x.contiguous()
            io["y." + path] = layer(x).contiguous()
            if pm64 is not None:
                io["y64." + path] = pm64.base_model.model.get_submodule(path)(x.double()).contiguous()
    save_file(io, os.path.join(out, "io.safetensors"))

    merged = contiguous(copy.deepcopy(pm).merge_and_unload().state_dict())
    save_file(merged, os.path.join(out, "merged_model.safetensors"), metadata={"format": "pt"})
    if pm64 is not None:
        merged64 = contiguous(copy.deepcopy(pm64).merge_and_unload().state_dict())
        save_file(merged64, os.path.join(out, "merged_f64.safetensors"), metadata={"format": "pt"})

    # Sanity: the merged model's layers reproduce PEFT's forward.
    merged_model = copy.deepcopy(pm).merge_and_unload()
    with torch.no_grad():
        for path in MODULES:
            y = merged_model.get_submodule(path)(io["x." + path])
            ref = io["y." + path]
            rel = ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
            meta["modules"][path]["merged_forward_rel_diff"] = rel
            print(f"  {name} {path}: r={meta['modules'][path]['r']} alpha={meta['modules'][path]['lora_alpha']} "
                  f"scaling={meta['modules'][path]['scaling']:.6g} merged-vs-unmerged forward rel diff {rel:.2e}")
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return name


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/data/peft")
    ap.add_argument("--only", nargs="*", help="make only these cases (the others stay as they are)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, peft {peft.__version__}")
    os.makedirs(args.out, exist_ok=True)
    made = [make_case(args.out, spec) for spec in CASES + CASES_BF16_ADAPTER
            if not args.only or spec["name"] in args.only]
    for list_name, specs in (("cases.json", CASES), ("cases_bf16_adapter.json", CASES_BF16_ADAPTER)):
        with open(os.path.join(args.out, list_name), "w") as f:
            json.dump([spec["name"] for spec in specs], f, indent=1)
    print("wrote", ", ".join(made))


if __name__ == "__main__":
    main()
