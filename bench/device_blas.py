#!/usr/bin/env python3
# Which backend wins where: the step and the evaluation forward on each backend (bench/run_device_blas.sh
# builds the drivers), interleaved (every backend once per round, minimum over rounds of the per-run medians),
# with torch's frozen nn.Linear (MKL) in the same rounds as the limit.
import json, os, subprocess, sys
sys.path.insert(0, "bench")
import torch
from peft_compare import time_peft, time_peft_eval

out = sys.argv[1] if len(sys.argv) > 1 else "bench-out"
BACKENDS = [("eigen", "/tmp/sd_eigen", {}), ("openblas", "/tmp/sd_openblas", {}),
            ("openblas-skx", "/tmp/sd_openblas", {"OPENBLAS_CORETYPE": "SkylakeX"}),
            ("blis", "/tmp/sd_blis", {})]
STEP = [(4096, 4096, 16, 512), (11008, 4096, 64, 512), (4096, 4096, 16, 32)]
EVAL = [(4096, 4096, 16, 1), (4096, 4096, 16, 32)]

def drv(path, env_extra, t, s, reps, methods):
    env = dict(os.environ, OMP_NUM_THREADS=str(t), OPENBLAS_NUM_THREADS=str(t), BLIS_NUM_THREADS=str(t), **env_extra)
    o = subprocess.run([path, *map(str, s), str(reps), *methods], env=env, check=True, capture_output=True, text=True).stdout
    return {j["method"]: j["median_ms"] for j in map(json.loads, [l for l in o.splitlines() if l.startswith("{")])}

rows = []
for t in [16, 1]:
    torch.set_num_threads(t)
    rounds, reps = (2, 5) if t == 16 else (1, 3)
    for kind, shapes, methods in [("step", STEP, ["base", "lora", "dora", "doraexact"]),
                                  ("eval", EVAL, ["basefwd", "lorainfer", "dorainfer"])]:
        for s in shapes:
            if t == 1 and kind == "step" and s[3] == 32:
                continue
            row = {"threads": t, "kind": kind, "shape": "/".join(map(str, s))}
            for _ in range(rounds):
                tb = time_peft("base", *s, reps) if kind == "step" else time_peft_eval("base", *s, 9)
                row["torch"] = min(row.get("torch", 1e30), tb)
                for name, path, env in BACKENDS:
                    for k, v in drv(path, env, t, s, reps, methods).items():
                        key = f"{name}:{k}"
                        row[key] = min(row.get(key, 1e30), v)
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(os.path.join(out, "blas.json"), "w") as f:
                json.dump(rows, f)

names = [b[0] for b in BACKENDS]
print("\n| kind | shape | thr | torch frozen | " + " | ".join(f"{n} base / LoRA / DoRA / exact" for n in names) + " |")
print("|---|---|---|---|" + "---|" * len(names))
for r in rows:
    ms = ["base", "lora", "dora", "doraexact"] if r["kind"] == "step" else ["basefwd", "lorainfer", "dorainfer"]
    cells = [" / ".join(f"{r[n + ':' + m]:.2f}" for m in ms) for n in names]
    print(f"| {r['kind']} | {r['shape']} | {r['threads']} | {r['torch']:.2f} | " + " | ".join(cells) + " |")
