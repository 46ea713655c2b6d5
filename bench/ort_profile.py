#!/usr/bin/env python3
"""ONNX Runtime's own per-node times for one of compare.py's graphs, to set against visenc's layers
(`visenc bench --kernels` times ResNet-50's convolutions one by one as visenc runs them).

    /work/pyref/bin/python bench/ort_profile.py resnet50 [--batch 8] [--runs 12]

Runs the graph from compare.py's cache (`prepare` builds it) with the session options compare.py's `ort`
runtime uses (2 intra-op threads, sequential, every graph optimisation) and `enable_profiling`, then prints
each forward's total, the per-node median over the runs after the first two, grouped by operator and
node by node with input and output shapes. Profiling times every node, so the forwards run slower than
compare.py's unprofiled ones: compare shares and patterns, not sums with other runs.
"""

import argparse
import collections
import json
import os
import sys

import numpy as np
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import compare  # noqa: E402  (the workloads and the model cache)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workload", choices=list(compare.WORKLOADS))
    ap.add_argument("--cache", default=os.environ.get("VISENC_BENCH_CACHE", "/work/bench-models"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=12)
    a = ap.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = compare.THREADS, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(a.cache, "out", f"ort-profile-{os.getpid()}")
    os.makedirs(os.path.dirname(so.profile_file_prefix), exist_ok=True)
    s = ort.InferenceSession(compare.onnx_path(a.cache, a.workload), so, providers=["CPUExecutionProvider"])
    x = compare.pixels(0, a.batch, compare.WORKLOADS[a.workload]["size"])
    name = s.get_inputs()[0].name
    for _ in range(a.runs):
        s.run(None, {name: x})
    with open(s.end_profiling()) as f:
        events = json.load(f)
    runs = [e["dur"] / 1e3 for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    print("forwards (ms):", " ".join(f"{t:.1f}" for t in runs))
    nodes = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            nodes[e["name"][:-len("_kernel_time")]].append(e)
    rows = []
    for node, ev in nodes.items():
        times = sorted(e["dur"] / 1e3 for e in ev[2:] or ev)
        args = ev[0]["args"]
        rows.append((times[len(times) // 2], node, args.get("op_name"), args.get("input_type_shape"),
                     args.get("output_type_shape")))
    by_op = collections.Counter()
    for t, _, op, _, _ in rows:
        by_op[op] += t
    print(f"sum of node medians {sum(r[0] for r in rows):.1f} ms:",
          ", ".join(f"{op} {t:.1f}" for op, t in by_op.most_common()))
    for t, node, op, ins, outs in rows:
        shapes = lambda v: " ".join("x".join(map(str, next(iter(d.values())))) for d in v or [])
        print(f"{t:8.2f} ms  {op:18s} {node[:48]:48s} in {shapes(ins)} -> {shapes(outs)}")


if __name__ == "__main__":
    main()
