#!/usr/bin/env python3
"""A real checkpoint layout for dora-merge: a tiny random LlamaForCausalLM saved by transformers,
a DoRA adapter on every projection plus embed_tokens and lm_head saved by PEFT, and PEFT's own
merge_and_unload() of it, in float32 and bfloat16.

Writes, under --out (default tests/data/peft_layers):
  llama_<dt>/base/model.safetensors      LlamaForCausalLM.save_pretrained (dt = f32, bf16)
  llama_<dt>/base/config.json
  llama_<dt>/adapter/adapter_config.json PeftModel.save_pretrained (save_embedding_layers="auto",
  llama_<dt>/adapter/adapter_model.safetensors  which saves embed_tokens / lm_head base_layer.weight
                                         because they are targeted)
  llama_<dt>/merged/model.safetensors    merge_and_unload().save_pretrained
  llama_f32/base_sharded/                the f32 base saved with a small max_shard_size (index + shards)
  make_llama_reference.log               versions, the model, every adapted module, self-checks

The model (hidden 64, 2 layers, vocab 128, intermediate 96, 4 heads, 2 kv heads, untied lm_head)
is random: torch.manual_seed(0). The adapter is LoraConfig(r=4, lora_alpha=8, use_dora=True,
init_lora_weights=False, target_modules = q,k,v,o,gate,up,down,embed_tokens,lm_head) with
rank_pattern {"embed_tokens": 8} and alpha_pattern {"o_proj": 4}, so every scaling rule is used.
init_lora_weights=False leaves A and B as created (nonzero); the embedding's A and B (randn) are
scaled by 0.05 so that the update is of the order of the weights, and every DoRA magnitude is
multiplied by (1 + 0.2 randn) so that m != ||W + s B A|| and the merge's m / n matters.

The bf16 variant is the same model cast to bfloat16; get_peft_model keeps the adapter in float32
(autocast_adapter_dtype=True, PEFT's default), so the adapter file holds float32 LoRA tensors and
bfloat16 base_layer weights, as a real bf16 fine-tune saves them.

Usage (needs torch, transformers, peft, safetensors; CPU is enough):
  CUDA_VISIBLE_DEVICES="" python3 tools/make_llama_reference.py --out tests/data/peft_layers
"""

import argparse
import copy
import os
import shutil
import sys

import torch

import peft
import safetensors
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]


def log(f, *args):
    line = " ".join(str(a) for a in args)
    print(line)
    f.write(line + "\n")


def keep_only(d, names):
    """save_pretrained also writes generation_config.json, README.md, ...: keep the files the tests use."""
    for n in os.listdir(d):
        if n not in names and not (n.startswith("model-") and n.endswith(".safetensors")):
            p = os.path.join(d, n)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def make(dtype, name, out, f, shard):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        vocab_size=128,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model = model.to(dtype)
    model.eval()
    root = os.path.join(out, f"llama_{name}")
    base_dir = os.path.join(root, "base")
    model.save_pretrained(base_dir, safe_serialization=True)
    keep_only(base_dir, {"model.safetensors", "config.json"})
    if shard:
        sd = os.path.join(root, "base_sharded")
        model.save_pretrained(sd, safe_serialization=True, max_shard_size="100KB")
        keep_only(sd, {"model.safetensors.index.json", "config.json"})
        log(f, f"{name}: sharded base: {sorted(os.listdir(sd))}")

    lcfg = LoraConfig(
        r=4,
        lora_alpha=8,
        use_dora=True,
        init_lora_weights=False,
        target_modules=TARGETS,
        rank_pattern={"embed_tokens": 8},
        alpha_pattern={"o_proj": 4},
        lora_dropout=0.0,
        bias="none",
    )
    pm = get_peft_model(copy.deepcopy(model), lcfg)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for mname, mod in pm.named_modules():
            if hasattr(mod, "lora_embedding_A") and "default" in mod.lora_embedding_A:
                A = mod.lora_embedding_A["default"]
                B = mod.lora_embedding_B["default"]
                A.mul_(0.05)
                B.mul_(0.05)
                # DoRA's magnitude was set from the unscaled A, B: set it to the norm PEFT would
                # have computed (per embedding dimension, over the vocabulary) for the scaled ones.
                W = mod.get_base_layer().weight.double()
                V = W + mod.scaling["default"] * (B.double() @ A.double()).T
                mag = mod.lora_magnitude_vector["default"].weight
                mag.copy_(torch.linalg.norm(V, dim=0).to(mag.dtype))
        for mname, mod in pm.named_modules():
            if hasattr(mod, "lora_magnitude_vector") and "default" in mod.lora_magnitude_vector:
                w = mod.lora_magnitude_vector["default"].weight
                w.mul_(1 + 0.2 * torch.randn(w.shape, generator=g, dtype=torch.float64).to(w.dtype))
    pm.eval()
    ad = os.path.join(root, "adapter")
    pm.save_pretrained(ad)  # save_embedding_layers="auto": True, embeddings are targeted
    keep_only(ad, {"adapter_config.json", "adapter_model.safetensors"})
    sd = load_file(os.path.join(ad, "adapter_model.safetensors"))
    for k in sorted(sd):
        log(f, f"{name}: adapter {k} {tuple(sd[k].shape)} {sd[k].dtype}")
    for mname, mod in pm.named_modules():
        if isinstance(getattr(mod, "scaling", None), dict) and "default" in mod.scaling:
            log(f, f"{name}: module {mname} {type(mod).__name__} r={mod.r['default']} scaling={mod.scaling['default']}")

    # A check that the magnitude was randomized: DoRA's m / n is not 1.
    ids = torch.arange(0, 16).view(1, 16)
    with torch.no_grad():
        y_peft = pm(input_ids=ids).logits.double()
    merged = copy.deepcopy(pm).merge_and_unload()
    merged.eval()
    with torch.no_grad():
        y_merged = merged(input_ids=ids).logits.double()
    scale = y_peft.abs().max().item()
    log(f, f"{name}: merged forward vs PEFT forward: max|diff| = {(y_merged - y_peft).abs().max().item():.3e} (max|y| = {scale:.3e})")
    md = os.path.join(root, "merged")
    merged.save_pretrained(md, safe_serialization=True)
    keep_only(md, {"model.safetensors"})
    # PEFT's merge in float64 from the same values, to say how far PEFT's own merge is from exact.
    pm64 = copy.deepcopy(pm).to(torch.float64)
    m64 = pm64.merge_and_unload().state_dict()
    ms = load_file(os.path.join(md, "model.safetensors"))
    base = load_file(os.path.join(base_dir, "model.safetensors"))
    for k in sorted(ms):
        if k not in m64:
            continue
        ref = m64[k]
        d = (ms[k].double() - ref).abs().max().item()
        changed = (ms[k].double() - base[k].double()).abs().max().item() if k in base else float("nan")
        log(f, f"{name}: merged {k} {tuple(ms[k].shape)} {ms[k].dtype}: max|PEFT - float64 merge| / max|ref| = "
               f"{d / max(ref.abs().max().item(), 1e-300):.3e}, max|merged - base| = {changed:.3e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/data/peft_layers")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    with open(os.path.join(args.out, "make_llama_reference.log"), "w") as f:
        log(f, f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
               f"safetensors {safetensors.__version__}, python {sys.version.split()[0]}")
        make(torch.float32, "f32", args.out, f, shard=True)
        make(torch.bfloat16, "bf16", args.out, f, shard=False)


if __name__ == "__main__":
    main()
