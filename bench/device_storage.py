#!/usr/bin/env python3
# Narrow frozen weights: see run_device_storage.sh. Prints a markdown table of ms and ratios to the f32 base.
import json, os, subprocess, sys

import argparse
ap = argparse.ArgumentParser()
ap.add_argument("out", nargs="?", default="bench-out")
ap.add_argument("--threads", type=int, nargs="+", default=[16, 1])
ap.add_argument("--shapes", nargs="+", default=["4096/4096/16/512", "11008/4096/64/512", "4096/4096/16/1"])
ap.add_argument("--rounds", type=int, default=0, help="rounds per row (default 3 at 16 threads, 2 at 1)")
ap.add_argument("--no-memory", action="store_true")
ap.add_argument("--dtypes", nargs="+", default=["f32", "bf16", "f16", "q8", "q4"], help="f32 first: the reference")
ap.add_argument("--tag", default="", help="suffix of the output files")
args = ap.parse_args()
out = args.out
DTYPES = args.dtypes
STEP = ["base", "lora", "dora", "doraexact"]

def drv(t, s, reps, methods, dtype):
    env = dict(os.environ, OMP_NUM_THREADS=str(t))
    o = subprocess.run(["/tmp/step_driver", *map(str, s), str(reps), *methods, "--base-dtype", dtype], env=env,
                       check=True, capture_output=True, text=True).stdout
    return {j["method"]: j["median_ms"] for j in map(json.loads, [l for l in o.splitlines() if l.startswith("{")])}

rows = []
for t in args.threads:
    rounds, reps = (3, 5) if t == 16 else (2, 3)
    rounds = args.rounds or rounds
    for s in [tuple(map(int, x.split("/"))) for x in args.shapes]:
        methods = STEP if s[3] > 1 else ["basefwd", "dorainfer"]
        row = {"threads": t, "shape": "/".join(map(str, s))}
        for _ in range(rounds):
            for dt in DTYPES:
                for k, v in drv(t, s, reps, methods, dt).items():
                    row[f"{dt}:{k}"] = min(row.get(f"{dt}:{k}", 1e30), v)
        rows.append(row)
        print(json.dumps(row), flush=True)

mem = []
for t in ([] if args.no_memory else [1, 16]):
    for dt in DTYPES:
        for m in ["lora", "dora"]:
            env = dict(os.environ, OMP_NUM_THREADS=str(t))
            o = subprocess.run(["/tmp/dora_memory", m, "11008", "4096", "64", "512", "--base-dtype", dt], env=env,
                               check=True, capture_output=True, text=True).stdout
            kv = dict(tok.split("=") for tok in o.split() if "=" in tok)
            kv["threads"] = t
            mem.append(kv)
            print(json.dumps(kv), flush=True)
with open(os.path.join(out, "storage%s.json" % args.tag), "w") as f:
    json.dump({"steps": rows, "memory": mem}, f)

print("\n| shape | thr | method | " + " | ".join(DTYPES) + " | " + " | ".join(f"{d}/f32" for d in DTYPES[1:]) + " |")
print("|---|---|---|" + "---|" * (2 * len(DTYPES) - 1))
for r in rows:
    for m in (STEP if not r["shape"].endswith("/1") else ["basefwd", "dorainfer"]):
        v = [r[f"{d}:{m}"] for d in DTYPES]
        print(f"| {r['shape']} | {r['threads']} | {m} | " + " | ".join(f"{x:.2f}" for x in v) + " | " +
              " | ".join(f"{x / v[0]:.3f}" for x in v[1:]) + " |")
print("\n| threads | dtype | method | weight_bytes | peak_rss_bytes | peak - W | (peak - W) - f32's (peak - W), / f32 W bytes |")
print("|---|---|---|---|---|---|---|")
ref = {(k["threads"], k["method"]): int(k["peak_rss_bytes"]) - int(k["weight_bytes"]) for k in mem if k["base_dtype"] == "f32"}
for k in mem:
    extra = int(k["peak_rss_bytes"]) - int(k["weight_bytes"])
    print(f"| {k['threads']} | {k['base_dtype']} | {k['method']} | {k['weight_bytes']} | {k['peak_rss_bytes']} | {extra} | "
          f"{(extra - ref[(k['threads'], k['method'])]) / int(k['float_weight_bytes']):+.4f} |")
