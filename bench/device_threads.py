#!/usr/bin/env python3
# The threads device run: old (9c78647, before the threads work) vs new step_driver, interleaved in 2
# rounds (min of the per-round medians), with torch's frozen nn.Linear and PEFT's DoRA step in the
# same run, at 16 and 1 threads; then evaluation forwards at n = 1 and 32.
import json, os, subprocess, sys, statistics
sys.path.insert(0, "bench")
import torch
from peft_compare import time_peft, time_peft_eval
SHAPES = [(4096, 4096, 16, 512), (11008, 4096, 64, 512), (4096, 4096, 16, 32)]
reps = 5
def drv(path, t, s, methods):
    env = dict(os.environ, OMP_NUM_THREADS=str(t))
    out = subprocess.run([path, *map(str, s), str(reps), *methods], env=env, check=True, capture_output=True, text=True).stdout
    return {j["method"]: j["median_ms"] for j in map(json.loads, [l for l in out.splitlines() if l.startswith("{")])}
rows = []
for t in [16, 1]:
    torch.set_num_threads(t)
    for s in SHAPES:
        row = {"threads": t, "shape": "/".join(map(str, s))}
        for rnd in range(2):
            row.setdefault("torch_base", []).append(time_peft("base", s[0], s[1], s[2], s[3], reps))
            for k, v in drv("/tmp/sd_new", t, s, ["base", "lora", "dora", "doraexact", "baseeigen"]).items():
                row.setdefault("new_" + k, []).append(v)
            for k, v in drv("/tmp/sd_old", t, s, ["base", "lora", "dora"]).items():
                row.setdefault("old_" + k, []).append(v)
        row["peft_dora"] = time_peft("dora", s[0], s[1], s[2], s[3], 3)
        for k in list(row):
            if isinstance(row[k], list): row[k] = min(row[k])
        rows.append(row)
        print(json.dumps(row), flush=True)
print("| shape | thr | torch frozen | PEFT DoRA | before: base (Eigen) / LoRA / DoRA | base (Eigen) | base (split) | LoRA | DoRA | DoRA exact | DoRA/LoRA | exact/LoRA | DoRA / (torch x (1+r/2n)) | PEFT/DoRA |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    d_out, d_in, rk, n = map(int, r["shape"].split("/"))
    lim = r["torch_base"] * (1 + rk / (2 * n))
    print(f"| {r['shape']} | {r['threads']} | {r['torch_base']:.1f} | {r['peft_dora']:.1f} | {r['old_base']:.1f} / {r['old_lora']:.1f} / {r['old_dora']:.1f} | {r['new_baseeigen']:.1f} | {r['new_base']:.1f} | {r['new_lora']:.1f} | {r['new_dora']:.1f} | {r['new_doraexact']:.1f} | {r['new_dora']/r['new_lora']:.3f} | {r['new_doraexact']/r['new_lora']:.3f} | {r['new_dora']/lim:.2f} | {r['peft_dora']/r['new_dora']:.2f} |", flush=True)
print()
print("| eval shape | thr | torch frozen fwd | PEFT DoRA eval | PEFT DoRA eval (DoraCaching) | dora base fwd | dora LoRA infer | dora DoRA infer | before: DoRA infer | DoRA infer / torch |")
print("|---|---|---|---|---|---|---|---|---|---|")
for t in [16, 1]:
    torch.set_num_threads(t)
    for s in [(4096, 4096, 16, 1), (4096, 4096, 16, 32)]:
        tb = min(time_peft_eval("base", *s, 9) for _ in range(2))
        pd = time_peft_eval("dora", *s, 5)
        pc = time_peft_eval("dora", *s, 5, cached=True)
        new = [drv("/tmp/sd_new", t, s, ["basefwd", "lorainfer", "dorainfer"]) for _ in range(2)]
        old = [drv("/tmp/sd_old", t, s, ["dorainfer"]) for _ in range(2)]
        b = min(x["basefwd"] for x in new); l = min(x["lorainfer"] for x in new); d = min(x["dorainfer"] for x in new)
        od = min(x["dorainfer"] for x in old)
        print(f"| {'/'.join(map(str, s))} | {t} | {tb:.3f} | {pd:.3f} | {pc:.3f} | {b:.3f} | {l:.3f} | {d:.3f} | {od:.3f} | {d/tb:.2f} |", flush=True)
