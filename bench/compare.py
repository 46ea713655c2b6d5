#!/usr/bin/env python3
"""Side-by-side benchmark of visenc, ONNX Runtime and PyTorch on the same weights and input shapes.

    /work/pyref/bin/python bench/compare.py            # prepare (cached) + measure + write results
    /work/pyref/bin/python bench/compare.py render     # rewrite BENCHMARKS.md from bench/results/latest.json

What one run does, strictly one measurement at a time:

1. prepare (once, cached in --cache, /work/bench-models by default, outside the repo): random-initialised,
   full-size models built with their own libraries and saved in the layouts visenc reads:
     transformers CLIPVisionModelWithProjection with the openai/clip-vit-base-patch16 config (built locally,
     no hub) + CLIPImageProcessor; timm resnet50, convnext_tiny, efficientnet_b0 (pretrained=False) via
     timm.models.save_for_hf. Norm parameters, BatchNorm statistics and layer-scale gammas are redrawn so no
     block is an identity (timm zero-inits the last BN of each ResNet block; ConvNeXt's gammas start at 1e-6).
   Each is exported to ONNX (torch.onnx.export, TorchScript exporter, opset 17, dynamic batch); ViT-B/16 @448
   gets its own graph (position embeddings interpolated exactly as transformers' interpolate_pos_encoding).
2. for each workload and batch 1 and 8, each runtime in a fresh subprocess (so peak RSS is per runtime), in
   --rounds rounds (2: the runtimes in turn, then in reverse order; each cell keeps its fastest round;
   visenc f32 and ORT, whose ratios the f32 targets are, alternate for --rounds-f32 rounds, 4 by default):
     ort         onnxruntime, intra_op_num_threads=2, inter_op 1, ORT_SEQUENTIAL, all graph optimisations
     torch       PyTorch f32, torch.set_num_threads(2), inference_mode, channels_last for CNNs
     torch-bf16  the same under torch.autocast("cpu", dtype=torch.bfloat16)
     visenc      `visenc bench --json` with RAYON_NUM_THREADS=2 (f32)
   and the low-precision rows:
     visenc-bf16 / visenc-int8   the same with `--precision bf16` / `--precision int8`
     ort-int8    ONNX Runtime on the graph quantised by onnxruntime.quantization.quantize_dynamic
                 (per_channel=True, int8 weights, uint8 activations; transformer workloads only)
   `--runtimes` picks a subset (e.g. `--only clip-vit-b16-224 --batches 8 --runtimes visenc-int8 ort-int8`).
   Every runtime computes the same thing: CLIP image_embeds (vision tower + projection); timm pre-logits
   and logits (the full forward). The batch-1 process of each runtime first encodes one fixed check batch
   (2 images) and writes its embedding; cosines against PyTorch f32 are reported.
3. kernel micro-benchmarks: `visenc bench --kernels --json` (visenc's kernels as its models call them,
   against the measured FMA peak) and the same shapes through PyTorch (MKL / oneDNN) for context.
   For CLIP ViT-B/16 @224, `visenc embed --precision bf16|int8` on the real photos in assets/photos is compared
   with `--precision f32` (per-image cosine; random weights, so this checks the arithmetic, not accuracy).
4. writes --out (bench/results/latest.json) and, after a full run (every workload, runtime and batch, and
   the kernels), the generated part of BENCHMARKS.md; a partial run (--only, --runtimes, --batches,
   --skip-kernels) writes its tables next to --out instead (`<out>.md`), so it never replaces the full
   table with a subset.

The machine is shared: before each measurement the script waits (bounded) until other processes use less
than --quiet-cores of CPU, and records the CPU time other processes used during the measurement
(`other_load_cores`); cells measured under load are flagged in the tables. Right before and after each
measurement it also measures the FMA peak of one thread and of all threads (`visenc bench --peak`, ~1 s):
where the threads did not scale (`core_scaling`, the lower of the two probes, below SHARED x THREADS) they
shared a core, which no load figure shows; those cells are flagged too. Flagged cells are measured again at
the end of the run while --retry-budget lasts.
"""

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
THREADS = 2

WORKLOADS = {
    "clip-vit-b16-224": dict(title="CLIP ViT-B/16 @224", kind="clip", ckpt="clip-vit-base-patch16", size=224,
                             target=1.15),
    "clip-vit-b16-448": dict(title="CLIP ViT-B/16 @448", kind="clip", ckpt="clip-vit-base-patch16", size=448,
                             target=1.15),
    "resnet50": dict(title="ResNet-50", kind="timm", arch="resnet50", ckpt="timm-resnet50", size=224, target=1.0),
    "convnext_tiny": dict(title="ConvNeXt-T", kind="timm", arch="convnext_tiny", ckpt="timm-convnext_tiny",
                          size=224, target=1.0),
    "efficientnet_b0": dict(title="EfficientNet-B0", kind="timm", arch="efficientnet_b0",
                            ckpt="timm-efficientnet_b0", size=224, target=1.0),
}
BF16_TARGET = 1.25  # visenc bf16 vs PyTorch bf16 autocast
RUNTIMES = ["ort", "torch", "torch-bf16", "visenc"]
F32_PAIR = ("visenc", "ort")  # the f32 targets' pair, measured in --rounds-f32 rounds
LOWP_RUNTIMES = ["visenc-bf16", "visenc-int8", "ort-int8"]
PRECISION = {"visenc-bf16": "bf16", "visenc-int8": "int8"}
INT8_TARGET = 1.0  # visenc int8 vs ORT dynamic int8
INT8_MIN_COSINE = 0.995  # int8 embeddings vs f32 on real photos (the criterion)
CHECK_BATCH = 2
LOADED = 0.3  # cores of other processes' CPU use above which a measurement is flagged (and retried)
# A measurement is also flagged (and retried) where the FMA peak of THREADS threads, probed right before and
# after it (`visenc bench --peak`), was below SHARED x THREADS x one thread's: the threads then shared a
# core's FMA units (cloud vCPUs on sibling hyperthreads of a busy host), which /proc/stat does not show.
SHARED = 0.85


# ---------------------------------------------------------------------------------------------------------
# Small helpers shared by the orchestrator and the workers

def loaded(run):
    """Other processes used the cores during this measurement."""
    return run.get("other_load_cores", 0) > LOADED


def shared(run):
    """This measurement's threads shared a core (probed FMA peak did not scale with the threads)."""
    return (run.get("core_scaling") or THREADS) < SHARED * THREADS


def cores_lost(run):
    """How much of the machine a measurement missed, in cores: other processes' use plus the threads'
    missing FMA scaling. Retries keep the measurement that lost less."""
    return run.get("other_load_cores", 0) + max(0.0, THREADS - (run.get("core_scaling") or THREADS))


def disturbed(run):
    return loaded(run) or shared(run)


def proc_status_mib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def pixels(seed, batch, size):
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size), dtype=np.float32)


def time_loop(fn, warmup, seconds, min_iters, iters=None):
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while True:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if iters is not None:
            if len(times) >= iters:
                break
        elif len(times) >= max(1, min_iters) and time.perf_counter() - start >= seconds:
            break
    return times


def stats(times):
    t = sorted(times)
    n = len(t)
    med = t[n // 2] if n % 2 else (t[n // 2 - 1] + t[n // 2]) / 2
    p90 = t[min(n, max(1, -(-9 * n // 10))) - 1]
    return dict(median=med, p90=p90, min=t[0], max=t[-1], mean=sum(t) / n, n=n, all=times)


def cpu_busy_jiffies():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal
    return sum(v[i] for i in (0, 1, 2, 5, 6)), (v[7] if len(v) > 7 else 0)


def other_load(seconds=1.0):
    """Cores' worth of CPU used by other processes over `seconds` (this process idles meanwhile)."""
    hz = os.sysconf("SC_CLK_TCK")
    b0, _ = cpu_busy_jiffies()
    time.sleep(seconds)
    b1, _ = cpu_busy_jiffies()
    return (b1 - b0) / hz / seconds


def ckpt_dir(cache, w):
    return os.path.join(cache, WORKLOADS[w]["ckpt"])


def onnx_path(cache, w):
    return os.path.join(cache, "onnx", w + ".onnx")


def int8_onnx_path(cache, w):
    return os.path.join(cache, "onnx", f"{w}.int8.onnx")


def check_input_path(cache, w):
    return os.path.join(cache, "check", w + ".input.npy")


# ---------------------------------------------------------------------------------------------------------
# Model construction (prepare): needs torch, timm, transformers

def randomize_norms(model, seed):
    """Redraws norm affine parameters, BatchNorm statistics and layer-scale gammas (seeded)."""
    import torch
    import torch.nn as nn

    g = torch.Generator().manual_seed(seed)
    r = lambda t: torch.randn(t.shape, generator=g, dtype=torch.float32)
    with torch.no_grad():
        for name, mod in model.named_modules():
            cls = type(mod).__name__
            is_bn = isinstance(mod, nn.modules.batchnorm._BatchNorm)
            is_norm = is_bn or isinstance(mod, (nn.LayerNorm, nn.GroupNorm)) or cls.endswith("LayerNorm2d") \
                or cls.endswith("LayerNorm")
            if is_norm:
                if getattr(mod, "weight", None) is not None:
                    mod.weight.copy_(1.0 + 0.1 * r(mod.weight))
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(0.1 * r(mod.bias))
            if is_bn:
                mod.running_mean.copy_(0.1 * r(mod.running_mean))
                mod.running_var.copy_(0.75 + 0.5 * torch.rand(mod.running_var.shape, generator=g))
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "gamma" or ".ls1." in name or ".ls2." in name:
                p.copy_(0.5 + 0.2 * r(p))


def build_wrapper(kind, model, size):
    """The module every runtime runs: CLIP -> image_embeds; timm -> (pre_logits, logits)."""
    import torch

    if kind == "clip":
        native = model.config.vision_config.image_size if hasattr(model.config, "vision_config") \
            else model.config.image_size

        class Clip(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, pixel_values):
                out = self.m(pixel_values=pixel_values, interpolate_pos_encoding=size != native)
                return out.image_embeds

        return Clip(model).eval()

    class Timm(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values):
            f = self.m.forward_features(pixel_values)
            pre = self.m.forward_head(f, pre_logits=True)
            return pre, self.m.get_classifier()(pre)

    return Timm(model).eval()


def load_reference(w, cache):
    """The saved checkpoint, loaded back with its own library (what PyTorch times and ONNX exports)."""
    spec = WORKLOADS[w]
    d = ckpt_dir(cache, w)
    if spec["kind"] == "clip":
        from transformers import CLIPVisionModelWithProjection

        return CLIPVisionModelWithProjection.from_pretrained(d).eval()
    import timm

    return timm.create_model("local-dir:" + d, pretrained=True).eval()


def prepare(cache, force=False):
    import torch

    torch.set_num_threads(THREADS)
    os.makedirs(os.path.join(cache, "onnx"), exist_ok=True)
    os.makedirs(os.path.join(cache, "check"), exist_ok=True)
    made = set()
    for w, spec in WORKLOADS.items():
        d = ckpt_dir(cache, w)
        if spec["ckpt"] not in made and (force or not os.path.exists(os.path.join(d, "model.safetensors"))):
            t = time.time()
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            torch.manual_seed(0)
            if spec["kind"] == "clip":
                from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

                # openai/clip-vit-base-patch16's vision_config, written out (no hub access).
                cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, projection_dim=512,
                                       num_hidden_layers=12, num_attention_heads=12, num_channels=3,
                                       image_size=224, patch_size=16, hidden_act="quick_gelu",
                                       layer_norm_eps=1e-5, attention_dropout=0.0, initializer_range=0.02,
                                       initializer_factor=1.0)
                model = CLIPVisionModelWithProjection(cfg).eval()
                randomize_norms(model, 1)
                model.save_pretrained(d, safe_serialization=True)
                CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                   resample=3, do_center_crop=True, do_resize=True, do_rescale=True,
                                   do_normalize=True, do_convert_rgb=True,
                                   image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(d)
            else:
                import timm
                from timm.models import save_for_hf

                model = timm.create_model(spec["arch"], pretrained=False).eval()
                randomize_norms(model, 2)
                save_for_hf(model, d, safe_serialization=True)
            print(f"prepare: saved {d} ({time.time() - t:.1f} s)", file=sys.stderr)
        made.add(spec["ckpt"])
        p = onnx_path(cache, w)
        if force or not os.path.exists(p):
            t = time.time()
            model = build_wrapper(spec["kind"], load_reference(w, cache), spec["size"])
            x = torch.from_numpy(pixels(123, 1, spec["size"]))
            names = ["embedding"] if spec["kind"] == "clip" else ["embedding", "logits"]
            with torch.no_grad():
                torch.onnx.export(model, (x,), p, dynamo=False, opset_version=17, input_names=["pixel_values"],
                                  output_names=names,
                                  dynamic_axes={"pixel_values": {0: "batch"}, **{n: {0: "batch"} for n in names}})
            print(f"prepare: exported {p} ({time.time() - t:.1f} s)", file=sys.stderr)
        q = int8_onnx_path(cache, w)
        if spec["kind"] == "clip" and (force or not os.path.exists(q)):
            from onnxruntime.quantization import QuantType, quantize_dynamic

            t = time.time()
            quantize_dynamic(p, q, per_channel=True, weight_type=QuantType.QInt8)
            print(f"prepare: quantised {q} ({time.time() - t:.1f} s)", file=sys.stderr)
        c = check_input_path(cache, w)
        if force or not os.path.exists(c):
            np.save(c, pixels(1000, CHECK_BATCH, spec["size"]))


# ---------------------------------------------------------------------------------------------------------
# Workers (one fresh process per runtime x workload x batch)

def worker(a):
    spec = WORKLOADS[a.workload]
    size = spec["size"]
    x_np = pixels(7, a.batch, size)
    rss0 = proc_status_mib("VmRSS")
    t0 = time.perf_counter()
    result = dict(runtime=a.runtime, workload=a.workload, batch=a.batch, size=[size, size], threads=THREADS)
    if a.runtime in ("ort", "ort-int8"):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        graph = (int8_onnx_path if a.runtime == "ort-int8" else onnx_path)(a.cache, a.workload)
        sess = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
        result["version"] = ort.__version__
        run = lambda x: sess.run(None, {"pixel_values": x})[0]
        prep = lambda x: x
        ctx = None
    else:
        import torch

        torch.set_num_threads(THREADS)
        torch.set_num_interop_threads(1)
        result["version"] = torch.__version__
        model = build_wrapper(spec["kind"], load_reference(a.workload, a.cache), size)
        cnn = spec["kind"] == "timm"
        if cnn:
            model = model.to(memory_format=torch.channels_last)
        bf16 = a.runtime == "torch-bf16"

        def prep(x):
            t = torch.from_numpy(x)
            return t.contiguous(memory_format=torch.channels_last) if cnn else t

        def run(x):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(x)
            out = out[0] if isinstance(out, tuple) else out
            return out.float().numpy()

        if spec["kind"] == "clip":
            result["attn_implementation"] = getattr(model.m.config, "_attn_implementation", None)
    result["load_s"] = time.perf_counter() - t0
    result["rss_after_load_mib"] = proc_status_mib("VmRSS")
    result["rss_start_mib"] = rss0
    if a.check_output:
        e = run(prep(np.load(a.check_input)))
        np.save(a.check_output, np.ascontiguousarray(e, dtype=np.float32))
    x = prep(x_np)
    times = time_loop(lambda: run(x), a.warmup, a.seconds, a.min_iters, a.iters)
    s = stats(times)
    result.update(latency_s=s, img_per_s=a.batch / s["median"],
                  img_per_s_range=[a.batch / s["max"], a.batch / s["min"]],
                  peak_rss_mib=proc_status_mib("VmHWM"))
    print(json.dumps(result))


def torch_kernels(a):
    """The kernel shapes of `visenc bench --kernels`, through PyTorch (MKL/oneDNN), for context."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    out = []

    def bench(name, gflop, fn, dtype="f32"):
        with torch.inference_mode():
            s = stats(time_loop(fn, 2, a.seconds, 3))
        out.append(dict(name=name, dtype=dtype, gflop=gflop, median_ms=s["median"] * 1e3,
                        gflops=gflop / s["median"], gflops_best=gflop / s["min"]))

    x, y = torch.randn(1024, 1024), torch.randn(1024, 1024)
    bench("gemm f32", 2 * 1024 ** 3 / 1e9, lambda: x @ y)
    xb, yb = x.bfloat16(), y.bfloat16()
    bench("gemm bf16", 2 * 1024 ** 3 / 1e9, lambda: xb @ yb, "bf16")
    for name, k, n in [("vit linear qkv (fused)", 768, 2304), ("vit linear q/k/v/out", 768, 768),
                       ("vit linear fc1", 768, 3072), ("vit linear fc2", 3072, 768)]:
        xi, wi = torch.randn(8, 197, k), torch.randn(n, k)
        bench(name, 2 * 8 * 197 * k * n / 1e9, lambda xi=xi, wi=wi: F.linear(xi, wi))
    for name, cin, cout, kk, groups, hw in [("conv3x3 64->64", 64, 64, 3, 1, 56),
                                            ("conv1x1 256->64", 256, 64, 1, 1, 56),
                                            ("depthwise 3x3, 144 ch", 144, 144, 3, 144, 56),
                                            ("depthwise 7x7, 96 ch", 96, 96, 7, 96, 56)]:
        xi = torch.randn(8, cin, hw, hw).contiguous(memory_format=torch.channels_last)
        wi = torch.randn(cout, cin // groups, kk, kk).contiguous(memory_format=torch.channels_last)
        g = 2 * 8 * cout * hw * hw * (cin // groups) * kk * kk / 1e9
        bench(name, g, lambda xi=xi, wi=wi, kk=kk, groups=groups: F.conv2d(xi, wi, padding=kk // 2, groups=groups))
    q, k, v = (torch.randn(8, 12, 197, 64) for _ in range(3))
    bench("attention", 4 * 8 * 12 * 197 * 197 * 64 / 1e9, lambda: F.scaled_dot_product_attention(q, k, v))
    print(json.dumps(dict(version=torch.__version__, threads=THREADS, kernels=out)))


# ---------------------------------------------------------------------------------------------------------
# Orchestrator

class Runner:
    def __init__(self, a):
        self.a = a
        self.log = []
        self.waited = 0.0
        self.last_probe = (0.0, None)  # (time, core scaling)

    def probe(self, reuse_s=0.0):
        """FMA peak of THREADS threads over one thread's (`visenc bench --peak`); the last probe's if it is
        younger than `reuse_s` seconds; None if it cannot be measured."""
        t, scaling = self.last_probe
        if time.time() - t < reuse_s:
            return scaling
        env = dict(os.environ, RAYON_NUM_THREADS=str(THREADS))
        p = subprocess.run([self.a.visenc, "bench", "--peak", "--json", "--seconds", "0.4"], env=env,
                           capture_output=True, text=True, cwd=ROOT, preexec_fn=self.renice)
        try:
            scaling = json.loads(p.stdout)["fma_peak"]["scaling"]
        except (json.JSONDecodeError, KeyError):
            scaling = None
        self.last_probe = (time.time(), scaling)
        return scaling

    def wait_quiet(self):
        """Waits (bounded) until other processes leave the cores alone."""
        a = self.a
        t = time.time()
        load = other_load(0.5)
        while load > a.quiet_cores and time.time() - t < a.max_wait and self.waited < a.max_total_wait:
            time.sleep(1.0)
            load = other_load(1.0)
        w = time.time() - t
        self.waited += w
        return load, w

    def run(self, cmd, env_extra=None, timeout=900):
        """Runs one measurement process; returns (parsed JSON or None, info)."""
        env = dict(os.environ)
        env.update({"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
                    "RAYON_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"})
        env.update(env_extra or {})
        before_load, waited = self.wait_quiet()
        scaling_before = self.probe(reuse_s=5.0)
        hz = os.sysconf("SC_CLK_TCK")
        b0, st0 = cpu_busy_jiffies()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.time()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           preexec_fn=self.renice)
        wall = time.time() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        b1, st1 = cpu_busy_jiffies()
        child_cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        other = max(0.0, ((b1 - b0) / hz - child_cpu) / wall)
        probes = [x for x in (scaling_before, self.probe()) if x is not None]
        info = dict(wall_s=wall, child_cpu_s=child_cpu, other_load_cores=other, steal_s=(st1 - st0) / hz,
                    waited_s=waited, load_before_cores=before_load, core_scaling=min(probes) if probes else None)
        if p.returncode != 0:
            lines = p.stderr.strip().splitlines()
            err = next((l.strip() for l in lines if "error" in l.lower()), lines[-1] if lines else
                       "exit %d" % p.returncode)
            print(f"  FAILED ({p.returncode}): {' '.join(cmd)}\n    {err}", file=sys.stderr)
            info["error"] = err
            return None, info
        try:
            return json.loads(p.stdout), info
        except json.JSONDecodeError:
            info["error"] = "no JSON output: " + p.stdout[-300:]
            return None, info

    def cell(self, cmd, label):
        """Runs one measurement cell and logs it."""
        res, info = self.run(cmd)
        cell = dict(res or {}, run=info, cmd=cmd)
        if res is None:
            cell["error"] = info.get("error", "failed")
        else:
            sc = info["core_scaling"]
            print(f"{label} {res['img_per_s']:8.2f} img/s  median {res['latency_s']['median'] * 1e3:8.1f} ms  "
                  f"RSS {res['peak_rss_mib']:6.0f} MiB  (n={res['latency_s']['n']}, other load "
                  f"{info['other_load_cores']:.2f} cores, FMA scaling {sc or 0:.2f}x, {info['wall_s']:.0f} s)"
                  + (" SHARED CORES" if shared(info) else ""), file=sys.stderr)
        return cell

    def renice(self):
        """Runs the measured process at --nice (the machine is shared with build jobs); best effort."""
        if self.a.nice:
            try:
                os.nice(self.a.nice)
            except OSError:
                pass

    def visenc(self, *args):
        return [self.a.visenc, *args]


def timing_for(a, w, batch):
    """(warmup, seconds, min_iters) per cell: few iterations where one pass takes seconds."""
    big = w == "clip-vit-b16-448"
    if batch == 1:
        return (1, a.seconds_b1, 5 if not big else 3)
    return (1 if big else 2, a.seconds_b8, 3)


def measure(a):
    # Per-run names: other sessions may run this script on the same cache at the same time.
    a.outdir = os.path.join(a.cache, "out", str(os.getpid()))
    os.makedirs(a.outdir, exist_ok=True)
    # The shared target dir may be rebuilt by others during the run: time a private copy.
    os.makedirs(os.path.join(a.cache, "bin"), exist_ok=True)
    binary = os.path.join(a.cache, "bin", f"visenc-{os.getpid()}")
    shutil.copy2(a.visenc, binary)
    a.visenc_built = datetime.datetime.fromtimestamp(os.path.getmtime(a.visenc)).strftime("%Y-%m-%d %H:%M")
    a.visenc = binary
    R = Runner(a)
    started = time.time()
    results = dict(meta=meta(a), workloads={}, kernels=None, torch_kernels=None)
    print("prepare ...", file=sys.stderr)
    subprocess.run([PY, os.path.abspath(__file__), "prepare", "--cache", a.cache], check=True, cwd=ROOT)

    workloads = [w for w in WORKLOADS if not a.only or w in a.only]
    for w in workloads:
        spec = WORKLOADS[w]
        d = ckpt_dir(a.cache, w)
        entry = dict(title=spec["title"], size=spec["size"], checkpoint=d, cells={}, checks={})
        results["workloads"][w] = entry
        info = subprocess.run([a.visenc, "info", "--model", d, "--json"], capture_output=True, text=True)
        supported = info.returncode == 0
        entry["visenc_supported"] = supported
        if supported:
            entry["visenc_info"] = json.loads(info.stdout).get("info", {})
        else:
            entry["visenc_error"] = (info.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{w}: visenc cannot load it: {entry['visenc_error']}", file=sys.stderr)
        for batch in a.batches:
            warmup, seconds, min_iters = timing_for(a, w, batch)
            timing = ["--warmup", str(warmup), "--seconds", str(seconds), "--min-iters", str(min_iters)]
            runs = [rt for rt in RUNTIMES + LOWP_RUNTIMES
                    if rt in a.runtimes and not (rt == "ort-int8" and spec["kind"] != "clip")]
            # Round r runs the runtimes in turn, forwards in even rounds and backwards in odd ones, so
            # each gets the same share of the machine's fast and slow minutes; a cell keeps its
            # fastest round (`rounds` lists them all).
            # The f32 pair the targets compare (visenc, ORT) gets --rounds-f32 rounds: more chances
            # for each to meet a fast minute, alike for both.
            for r in range(max(a.rounds, a.rounds_f32)):
                this = [rt for rt in runs if r < a.rounds or (rt in F32_PAIR and r < a.rounds_f32)]
                for rt in this if r % 2 == 0 else this[::-1]:
                    round_cell(a, R, entry, w, spec, batch, rt, r, supported, timing)
        # Output agreement with PyTorch f32 on the check batch.
        ref_p = os.path.join(a.outdir, f"{w}.torch.npy")
        if os.path.exists(ref_p):
            ref = np.load(ref_p).astype(np.float64)
            for rt in RUNTIMES + LOWP_RUNTIMES:
                p = os.path.join(a.outdir, f"{w}.{rt}.npy")
                if rt == "torch" or not os.path.exists(p):
                    continue
                o = np.load(p).astype(np.float64)
                if o.shape != ref.shape:
                    entry["checks"][rt] = dict(error=f"shape {o.shape} vs {ref.shape}")
                    continue
                cos = (o * ref).sum(1) / (np.linalg.norm(o, axis=1) * np.linalg.norm(ref, axis=1))
                entry["checks"][rt] = dict(min_cosine=float(cos.min()),
                                           max_rel_err=float(np.abs(o - ref).max() / np.abs(ref).max()))
        if w == "clip-vit-b16-224" and supported and any(PRECISION.get(rt) for rt in a.runtimes):
            entry["photo_checks"] = photo_checks(a, d, w, [PRECISION[rt] for rt in a.runtimes if rt in PRECISION])
        save(a, results)

    retry_loaded(a, R, results, a.retry_budget)

    if not a.skip_kernels:
        for key, cmd in [("kernels", R.visenc("bench", "--kernels", "--json", "--seconds", str(a.kernel_seconds))),
                         ("torch_kernels", [PY, os.path.abspath(__file__), "torch-kernels", "--seconds",
                                            str(a.kernel_seconds)])]:
            res, info = R.run(cmd)
            if disturbed(info):  # once more; the less disturbed one is kept
                res2, info2 = R.run(cmd)
                if res2 and cores_lost(info2) < cores_lost(info):
                    res, info = res2, dict(info2, first_attempt_other_load_cores=info["other_load_cores"],
                                           first_attempt_core_scaling=info["core_scaling"])
            results[key] = dict(res or {}, run=info)
            print(f"{key}: other load {info['other_load_cores']:.2f} cores, FMA scaling "
                  f"{info['core_scaling'] or 0:.2f}x", file=sys.stderr)
    results["meta"]["total_s"] = time.time() - started
    results["meta"]["waited_for_quiet_s"] = R.waited
    save(a, results)
    render(a, results)


def round_cell(a, R, entry, w, spec, batch, rt, r, supported, timing):
    """Measures runtime `rt` on workload `w` at `batch` once (round `r`; only round 0 writes the check
    output), keeping in `entry` the fastest of its rounds."""
    d = entry["checkpoint"]
    key = f"{rt}@b{batch}"
    check_out = None
    if r == 0 and (batch == min(a.batches) or rt in LOWP_RUNTIMES):
        check_out = os.path.join(a.outdir, f"{w}.{rt}.npy")
        if os.path.exists(check_out):
            os.remove(check_out)
    if rt.startswith("visenc"):
        if not supported:
            entry["cells"][key] = dict(error="not yet supported: " + entry["visenc_error"])
            return
        cmd = R.visenc("bench", "--model", d, "--batch", str(batch), "--size", str(spec["size"]),
                       "--json", *timing)
        if rt in PRECISION:
            cmd += ["--precision", PRECISION[rt]]
    else:
        cmd = [PY, os.path.abspath(__file__), "worker", "--runtime", rt, "--workload", w,
               "--batch", str(batch), "--cache", a.cache, *timing]
    if check_out:
        cmd += ["--check-input", check_input_path(a.cache, w), "--check-output", check_out]
    new = R.cell(cmd, f"{w:18s} b{batch} {rt:11s} round {r + 1}")
    old = entry["cells"].get(key)
    rounds = (old or {}).get("rounds", []) + [new.get("img_per_s")]
    if old is None or new.get("img_per_s", 0) > old.get("img_per_s", 0):
        entry["cells"][key] = dict(new, round=r + 1)
    entry["cells"][key]["rounds"] = rounds


def photo_checks(a, d, w, precisions):
    """Per-image cosine of `visenc embed --precision p` to `--precision f32` on the real photos."""
    photos = os.path.join(ROOT, "assets", "photos")
    embs, out = {}, {}
    for p in ["f32"] + precisions:
        path = os.path.join(a.outdir, f"{w}.photos.{p}.npy")
        r = subprocess.run([a.visenc, "embed", "--model", d, photos, "--out", path, "--precision", p, "--quiet"],
                           capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, RAYON_NUM_THREADS="2"))
        if r.returncode != 0:
            out[p] = dict(error=(r.stderr.strip().splitlines() or ["?"])[-1])
            continue
        embs[p] = np.load(path).astype(np.float64)
    for p in precisions:
        if p in embs and "f32" in embs:
            x, y = embs[p], embs["f32"]
            cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
            out[p] = dict(images=len(cos), min_cosine=float(cos.min()), mean_cosine=float(cos.mean()))
            print(f"{w} photos {p}: min cosine to f32 {cos.min():.5f} over {len(cos)} images", file=sys.stderr)
    return out


def retry_loaded(a, R, results, budget):
    """Measures again the cells disturbed by other processes or shared cores (most disturbed first) while
    `budget` seconds last; the less disturbed of the two measurements is kept (`cores_lost`), the other is
    recorded in `first_attempt`."""
    start = time.time()
    todo = sorted(((cores_lost(c["run"]), w, k) for w in results["workloads"]
                   for k, c in results["workloads"][w]["cells"].items()
                   if "img_per_s" in c and disturbed(c["run"])), reverse=True)
    for lost, w, k in todo:
        if time.time() - start > budget:
            print(f"retry budget spent; {w} {k} stays disturbed ({lost:.2f} cores lost)", file=sys.stderr)
            continue
        old = results["workloads"][w]["cells"][k]
        new = R.cell(old["cmd"], f"{w:18s} {k:14s} (again)")
        first = dict(img_per_s=old["img_per_s"], other_load_cores=old["run"]["other_load_cores"],
                     core_scaling=old["run"].get("core_scaling"),
                     tries=old.get("first_attempt", {}).get("tries", 1) + 1)
        if "img_per_s" in new and cores_lost(new["run"]) < lost:
            results["workloads"][w]["cells"][k] = dict(new, first_attempt=first)
        else:
            old["first_attempt"] = dict(first, retry_img_per_s=new.get("img_per_s"),
                                        retry_other_load_cores=new["run"]["other_load_cores"],
                                        retry_core_scaling=new["run"].get("core_scaling"))
        save(a, results)
    results["meta"]["retry_s"] = results["meta"].get("retry_s", 0) + time.time() - start


def retry(a):
    """`compare.py retry`: measures again, with the same binary and settings, the cells of --out that other
    processes disturbed, then rewrites --out and BENCHMARKS.md."""
    with open(a.out) as f:
        results = json.load(f)
    R = Runner(a)
    t = time.time()
    retry_loaded(a, R, results, a.retry_budget)
    results["meta"]["commands"] = results["meta"].get("commands", [results["meta"]["command"]]) + [
        " ".join(["/work/pyref/bin/python", "bench/compare.py"] + a.argv)]
    results["meta"]["total_s"] = results["meta"].get("total_s", 0) + time.time() - t
    results["meta"]["waited_for_quiet_s"] = results["meta"].get("waited_for_quiet_s", 0) + R.waited
    save(a, results)
    render(a, results)


def save(a, results):
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)


def sh(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return ""


def meta(a):
    import importlib.metadata as md

    def ver(p):
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return None

    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = open("/proc/cpuinfo").read()
    candle = ""
    try:
        lock = open(os.path.join(ROOT, "Cargo.lock")).read()
        i = lock.find('name = "candle-core"')
        candle = lock[i:].splitlines()[1].split('"')[1] if i >= 0 else ""
    except OSError:
        pass
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        commit=sh(["git", "rev-parse", "HEAD"]), dirty=bool(sh(["git", "status", "--porcelain", "--untracked-files=no"])),
        command=" ".join(["/work/pyref/bin/python", "bench/compare.py"] + a.argv), argv=a.argv,
        cpu=cpu, cores=os.cpu_count(), avx512="avx512f" in flags, avx512_bf16="avx512_bf16" in flags,
        mem_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
        threads=THREADS, python=platform.python_version(),
        versions=dict(torch=ver("torch"), onnxruntime=ver("onnxruntime"), onnx=ver("onnx"), timm=ver("timm"),
                      transformers=ver("transformers"), numpy=ver("numpy"), candle=candle),
        batches=a.batches, rounds=a.rounds, rounds_f32=a.rounds_f32, seconds_b1=a.seconds_b1, seconds_b8=a.seconds_b8, nice=a.nice,
        visenc_binary_built=getattr(a, "visenc_built", None),
    )


# ---------------------------------------------------------------------------------------------------------
# Report

BEGIN = "<!-- BEGIN GENERATED by bench/compare.py: do not edit by hand -->"
END = "<!-- END GENERATED -->"


def is_full(m):
    """Whether the run the metadata `m` describes measured everything (only then may it replace the table)."""
    argv = m.get("argv", [])
    return not any(f in argv for f in ("--only", "--runtimes", "--batches", "--skip-kernels"))


def render(a, results=None):
    if results is None:
        with open(a.out) as f:
            results = json.load(f)
    text = report(results)
    if not is_full(results["meta"]):
        path = os.path.splitext(a.out)[0] + ".md"
        with open(path, "w") as f:
            f.write(text.replace(BEGIN, "").replace(END, "").strip() + "\n")
        print(f"partial run: wrote {path} (BENCHMARKS.md keeps the last full run)", file=sys.stderr)
        return
    path = os.path.join(ROOT, "BENCHMARKS.md")
    old = open(path).read() if os.path.exists(path) else ""
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    else:
        new = "# Benchmarks\n\n" + text + "\n" + old
    with open(path, "w") as f:
        f.write(new)
    print(f"wrote {path}", file=sys.stderr)


def report(res):
    m = res["meta"]
    L = [BEGIN, ""]
    dirty = " (with uncommitted changes)" if m.get("dirty") else ""
    L += [f"Measured {m['date']} on commit `{m['commit'][:12]}`{dirty}, with:", "", "```sh",
          "cargo build --release -p visenc-cli && " + m["command"]] + m.get("commands", [None])[1:] + ["```", ""]
    v = m["versions"]
    L += [f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB, AVX-512 {'yes' if m['avx512'] else 'no'}"
          f" (BF16 {'yes' if m['avx512_bf16'] else 'no'}); {m['threads']} threads for every runtime. "
          f"visenc with candle {v.get('candle')}; ONNX Runtime {v.get('onnxruntime')}; PyTorch {v.get('torch')} "
          f"(timm {v.get('timm')}, transformers {v.get('transformers')}). Random-initialised full-size models, the "
          f"same weights for every runtime; random N(0,1) pixels. Whole run: {m.get('total_s', 0) / 60:.1f} min "
          f"(of which {m.get('waited_for_quiet_s', 0):.0f} s waiting for other processes to leave the cores).", ""]

    W = res["workloads"]

    def cell(w, rt, b):
        return W[w]["cells"].get(f"{rt}@b{b}", {})

    def ips(w, rt, b):
        c = cell(w, rt, b)
        return c.get("img_per_s")

    def flag(c):
        run = c.get("run", {})
        return (" †" if loaded(run) else "") + (" ‡" if shared(run) else "")

    def fmt_ips(w, rt, b):
        c = cell(w, rt, b)
        if "img_per_s" in c:
            lo, hi = c["img_per_s_range"]
            return f"{c['img_per_s']:.2f} ({lo:.2f}–{hi:.2f}){flag(c)}"
        if rt.startswith("visenc") and not W[w].get("visenc_supported", True):
            return "not yet supported"
        return "error" if c else "–"

    def ratio(x, y):
        return f"{x / y:.2f}×" if x and y else "–"

    def doubtful(w, rt, b):
        return disturbed(cell(w, rt, b).get("run", {}))

    def cratio(w, rt1, rt2, b):
        r = ratio(ips(w, rt1, b), ips(w, rt2, b))
        flags = flag(cell(w, rt1, b)) + flag(cell(w, rt2, b))
        return r + ("".join(m for m in (" †", " ‡") if m in flags) if r != "–" else "")

    batches = m.get("batches", [1, 8])
    rounds = m.get("rounds", 1)
    rounds_f32 = max(rounds, m.get("rounds_f32", rounds))
    if rounds_f32 > 1:
        L += [f"Each cell was measured in {rounds} rounds, the runtimes of a workload and batch in turn (forwards, "
              "then backwards), and keeps its fastest round: the machine's speed moves by up to ~30 % from one "
              "minute to the next for every runtime alike, and this gives each the same chances."
              + (f" visenc f32 and ONNX Runtime f32, the pair of the f32 targets, went on alternating for "
                 f"{rounds_f32} rounds." if rounds_f32 > rounds else ""), ""]
    for b in sorted(batches, reverse=True):
        L += [f"### Throughput at batch {b} (img/s, median; min–max over the timed runs)", "",
              "| workload | visenc f32 | ONNX Runtime f32 | PyTorch f32 | PyTorch bf16 autocast | "
              "visenc/ORT | visenc/PyTorch f32 | visenc f32/PyTorch bf16 |",
              "|---|---|---|---|---|---|---|---|"]
        for w in W:
            L.append(f"| {W[w]['title']} | {fmt_ips(w, 'visenc', b)} | {fmt_ips(w, 'ort', b)} | "
                     f"{fmt_ips(w, 'torch', b)} | {fmt_ips(w, 'torch-bf16', b)} | "
                     f"{cratio(w, 'visenc', 'ort', b)} | {cratio(w, 'visenc', 'torch', b)} | "
                     f"{cratio(w, 'visenc', 'torch-bf16', b)} |")
        L.append("")

    lowp = [rt for rt in LOWP_RUNTIMES if any(f"{rt}@b{b}" in W[w]["cells"] for w in W for b in batches)]
    if lowp:
        L += ["### Low precision: throughput (img/s, median; min–max) and agreement with PyTorch f32", "",
              "bf16: bf16 products with f32 sums (visenc `--precision bf16`, PyTorch autocast). int8: int8 weights per "
              "output channel, uint8 activations quantised at run time (visenc `--precision int8`: per row; ORT "
              "`quantize_dynamic(per_channel=True)`: per tensor). In visenc norms, activations and the softmax "
              "stay f32; in bf16 its attention products are bf16 too (as autocast's).",
              "", "| workload | batch | visenc bf16 | PyTorch bf16 autocast | visenc bf16/PyTorch bf16 | visenc int8 | "
              "ORT int8 | visenc int8/ORT int8 | cos visenc int8 | cos ORT int8 |", "|---|---|---|---|---|---|---|---|---|---|"]
        for w in W:
            for b in sorted(batches, reverse=True):
                def cos(rt):
                    c = W[w]["checks"].get(rt, {})
                    return f"{c['min_cosine']:.5f}" if "min_cosine" in c else "–"
                L.append(f"| {W[w]['title']} | {b} | {fmt_ips(w, 'visenc-bf16', b)} | {fmt_ips(w, 'torch-bf16', b)} | "
                         f"{cratio(w, 'visenc-bf16', 'torch-bf16', b)} | {fmt_ips(w, 'visenc-int8', b)} | "
                         f"{fmt_ips(w, 'ort-int8', b)} | {cratio(w, 'visenc-int8', 'ort-int8', b)} | "
                         f"{cos('visenc-int8')} | {cos('ort-int8')} |")
        L.append("")
        for w in W:
            pc = W[w].get("photo_checks")
            if pc:
                L += [f"{W[w]['title']} on the real photos (`assets/photos`), `visenc embed --precision p` vs "
                      "`--precision f32`, per-image cosine: " + "; ".join(
                          f"{p}: min {c['min_cosine']:.5f}, mean {c['mean_cosine']:.5f} over {c['images']} images"
                          if "min_cosine" in c else f"{p}: {c.get('error')}" for p, c in pc.items()) + ".", ""]

    if 1 in batches:
        L += ["### Latency at batch 1 (ms per image: median / p90)", "",
              "| workload | visenc f32 | ONNX Runtime f32 | PyTorch f32 | PyTorch bf16 autocast |",
              "|---|---|---|---|---|"]
        for w in W:
            row = [W[w]["title"]]
            for rt in ["visenc", "ort", "torch", "torch-bf16"]:
                c = cell(w, rt, 1)
                if "latency_s" in c:
                    s = c["latency_s"]
                    row.append(f"{s['median'] * 1e3:.1f} / {s['p90'] * 1e3:.1f}{flag(c)}")
                else:
                    row.append(fmt_ips(w, rt, 1))
            L.append("| " + " | ".join(row) + " |")
        L.append("")

    L += ["### Peak RSS (MiB, whole process: VmHWM), batch 1 / batch 8", "",
          "| workload | parameters | visenc f32 | ONNX Runtime | PyTorch f32 | PyTorch bf16 autocast |",
          "|---|---|---|---|---|---|"]
    for w in W:
        p = W[w].get("visenc_info", {}).get("parameters")
        if p is None:
            p = next((c.get("parameters") for c in W[w]["cells"].values() if c.get("parameters")), None)
        row = [W[w]["title"], f"{p / 1e6:.1f} M" if p else "–"]
        for rt in ["visenc", "ort", "torch", "torch-bf16"]:
            vals = [cell(w, rt, b).get("peak_rss_mib") for b in sorted(batches)]
            if any(vals):
                row.append(" / ".join(f"{x:.0f}" if x else "–" for x in vals))
            else:
                row.append(fmt_ips(w, rt, batches[0]))
        L.append("| " + " | ".join(row) + " |")
    L += ["", "Peers run in a fresh Python process per cell, so their RSS includes the interpreter and the library "
          "(`import torch` alone is a few hundred MiB); visenc's is the whole `visenc bench` process.", ""]

    L += ["### Output agreement with PyTorch f32 (check batch of 2 images, embedding: CLIP image_embeds, timm "
          "pre-logits)", "", "| workload | ONNX Runtime | PyTorch bf16 | visenc f32 | visenc bf16 | visenc int8 | "
          "ONNX Runtime int8 |", "|---|---|---|---|---|---|---|"]
    for w in W:
        row = [W[w]["title"]]
        for rt in ["ort", "torch-bf16", "visenc", "visenc-bf16", "visenc-int8", "ort-int8"]:
            c = W[w]["checks"].get(rt)
            if c and "min_cosine" in c:
                row.append(f"cos {c['min_cosine']:.6f}, rel {c['max_rel_err']:.1e}")
            elif rt.startswith("visenc") and not W[w].get("visenc_supported", True):
                row.append("not yet supported")
            else:
                row.append(c.get("error", "–") if c else "–")
        L.append("| " + " | ".join(row) + " |")
    L.append("")

    # Targets.
    L += ["### Targets (from the issue) at batch 8; batch 1 in brackets", "",
          "| target | measured (median) | best iteration vs best iteration | met? | gap |", "|---|---|---|---|---|"]

    def best(w, rt, b):
        c = cell(w, rt, b)
        return c["img_per_s_range"][1] if "img_per_s_range" in c else None

    def tgt(label, x8, y8, x1, y1, goal, note="", bx=None, by=None, unsure=False):
        if not (x8 and y8):
            L.append(f"| {label} | – | – | no{note} | not measured |")
            return
        r8 = x8 / y8
        r1 = f" [{x1 / y1:.2f}×]" if x1 and y1 else ""
        rb = f"{bx / by:.2f}×" if bx and by else "–"
        met = ("**yes**" + (" (with f32)" if "no working bf16" in label else "")) if r8 >= goal else "no"
        if unsure:
            met = ("not shown: " if r8 >= goal else "no, ") + "measured under load † or on shared cores ‡"
        gap = "–" if r8 >= goal else f"visenc needs {goal / r8:.2f}× its speed"
        L.append(f"| {label} | {r8:.2f}×{r1} | {rb} | {met}{note} | {gap} |")

    for w, spec in WORKLOADS.items():
        if w not in W:
            continue
        label = f"{spec['title']} f32 ≥ {spec['target']:.2f}× ORT"
        if not W[w].get("visenc_supported", True):
            L.append(f"| {label} | – | – | no (not yet supported) | visenc cannot load {spec['arch']} yet |")
            continue
        tgt(label, ips(w, "visenc", 8), ips(w, "ort", 8), ips(w, "visenc", 1), ips(w, "ort", 1), spec["target"],
            bx=best(w, "visenc", 8), by=best(w, "ort", 8), unsure=doubtful(w, "visenc", 8) or doubtful(w, "ort", 8))
    for w, spec in WORKLOADS.items():
        if w not in W or not W[w].get("visenc_supported", True):
            continue
        tgt(f"{spec['title']} bf16 ≥ {BF16_TARGET:.2f}× PyTorch bf16 (visenc `--precision bf16`)",
            ips(w, "visenc-bf16", 8), ips(w, "torch-bf16", 8), ips(w, "visenc-bf16", 1), ips(w, "torch-bf16", 1),
            BF16_TARGET, bx=best(w, "visenc-bf16", 8), by=best(w, "torch-bf16", 8),
            unsure=doubtful(w, "visenc-bf16", 8) or doubtful(w, "torch-bf16", 8))
        if spec["kind"] == "clip":
            tgt(f"{spec['title']} int8 ≥ {INT8_TARGET:.2f}× ORT dynamic int8 (visenc `--precision int8`)",
                ips(w, "visenc-int8", 8), ips(w, "ort-int8", 8), ips(w, "visenc-int8", 1), ips(w, "ort-int8", 1),
                INT8_TARGET, bx=best(w, "visenc-int8", 8), by=best(w, "ort-int8", 8),
                unsure=doubtful(w, "visenc-int8", 8) or doubtful(w, "ort-int8", 8))
        pc = W[w].get("photo_checks", {}).get("int8", {})
        if "min_cosine" in pc:
            ok = pc["min_cosine"] >= INT8_MIN_COSINE
            L.append(f"| {spec['title']} int8 embeddings at cosine ≥ {INT8_MIN_COSINE} to f32 on real photos | "
                     f"min {pc['min_cosine']:.5f} | – | {'**yes**' if ok else 'no'} | "
                     f"{'–' if ok else 'below the bound'} |")
    retried = [(W[w]["title"], k, c["first_attempt"]) for w in W for k, c in W[w]["cells"].items()
               if "first_attempt" in c]
    L += ["", f"† other processes used more than {LOADED} cores during this measurement (shared machine); ‡ its "
          f"threads shared cores (the FMA peak of {THREADS} threads, probed right before and after it, was below "
          f"{SHARED:.2f} x {THREADS} x one thread's: sibling hyperthreads of a busy host, which no load figure shows). "
          "Either flag stays only where measuring it again at the end of the run did not help; treat such a cell as a "
          "lower bound."
          + (f" Measured again because of load or shared cores: {len(retried)} cells ("
             + ", ".join(f"{t} {k.replace('@', ' ')}" for t, k, _ in retried) + ")." if retried else ""), ""]

    K = res.get("kernels") or {}
    TK = {k["name"]: k for k in (res.get("torch_kernels") or {}).get("kernels", [])}
    if K.get("kernels"):
        peak = K["fma_peak"]["gflops"]
        bf = K.get("bf16_dot_peak_gflops")
        L += ["### Kernel micro-benchmarks (as visenc calls them; 2 threads)", "",
              f"Other processes used {K['run']['other_load_cores']:.2f} cores on average during this part. "
              f"Measured FMA peak: **{peak:.0f} GFLOP/s** f32 ({K['fma_peak']['isa']}, 12 independent FMA chains per "
              f"thread, {K['threads']} threads; one thread alone: {K['fma_peak'].get('gflops_1_thread', 0):.0f}"
              + (" ‡: the threads shared cores" if shared(K["run"]) else "") + ")"
              + (f"; `vdpbf16ps` peak {bf:.0f} GFLOP/s bf16." if bf else "."), "",
              "| kernel | shape | ms (median) | visenc/candle GFLOP/s | of FMA peak | PyTorch GFLOP/s (same shape) | "
              "visenc or candle/PyTorch |",
              "|---|---|---|---|---|---|---|"]
        for k in K["kernels"]:
            # PyTorch ran the f32 batch-8 shapes only.
            same = re.sub(r" (f32 )?\((candle|visenc)\)$", "", k["name"])
            t = TK.get(same) if "(b1 x" not in k["shape"] and " bf16 " not in k["name"] + " " \
                and " int8 " not in k["name"] + " " else None
            tg = f"{t['gflops']:.1f}" if t else "–"
            # Element-wise kernels (no multiply-adds) have a time, not a rate.
            rate = (f"{k['gflops']:.1f} | {100 * k['fraction_of_peak']:.1f} %" if k["gflop"] else "– | –")
            L.append(f"| {k['name']} | {k['shape']} | {k['median_ms']:.2f} | {rate} | {tg} | "
                     f"{ratio(k['gflops'], t['gflops']) if t else '–'} |")
        L.append("")
        vb = K.get("vit_b16_block_b8")
        fwd = cell("clip-vit-b16-224", "visenc", 8).get("latency_s", {}).get("median") if "clip-vit-b16-224" in W else None
        if vb:
            tot = vb["block_ms"]
            L += ["### Where visenc's time goes: one ViT-B/16 block at batch 8, op by op", "",
                  f"Sum of one block's ops {tot:.0f} ms; x12 = {vb['trunk_estimate_ms'] / 1e3:.2f} s"
                  + (f" vs the measured whole forward {fwd:.2f} s at batch 8 (whose last block runs the "
                     "attention, projection and MLP for the class token alone: the pooled output reads "
                     "nothing else)." if fwd else "."), "",
                  "| op | per block | ms each | share of block | GFLOP/s |", "|---|---|---|---|---|"]
            for o in sorted(vb["ops"], key=lambda o: -o["median_ms"] * o["per_block"]):
                share = o["median_ms"] * o["per_block"] / tot
                L.append(f"| {o['op']} | {o['per_block']} | {o['median_ms']:.2f} | {100 * share:.1f} % | "
                         f"{o['gflops']:.1f} |" if o["gflops"] else
                         f"| {o['op']} | {o['per_block']} | {o['median_ms']:.2f} | {100 * share:.1f} % | – |")
            L.append("")
        rc = K.get("resnet50_convs_b8")
        rfwd = cell("resnet50", "visenc", 8).get("latency_s", {}).get("median") if "resnet50" in W else None
        if rc:
            L += [f"ResNet-50 at batch 8: its {sum(c['count'] for c in rc['convs'])} convolutions (with the folded-BN "
                  f"bias add), timed one by one, take {rc['total_ms'] / 1e3:.2f} s for {rc['total_gflop']:.1f} GFLOP "
                  f"({rc['gflops']:.0f} GFLOP/s, {100 * rc['gflops'] / peak:.0f} % of FMA peak, counting the direct "
                  f"convolutions' products: the 3x3 stride-1 ones run by Winograd with 2.25-4 products per output instead of 9)"
                  + (f"; the whole forward measured {rfwd:.2f} s." if rfwd else "."), ""]
    L.append(END)
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------------------

def main():
    argv = sys.argv[1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", nargs="?", default="run",
                    choices=["run", "prepare", "render", "retry", "worker", "torch-kernels"])
    ap.add_argument("--cache", default=os.environ.get("VISENC_BENCH_CACHE", "/work/bench-models"))
    ap.add_argument("--visenc", default=os.path.join(ROOT, "target", "release", "visenc"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "latest.json"))
    ap.add_argument("--only", nargs="*", help="workloads: " + ", ".join(WORKLOADS))
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--seconds-b1", type=float, default=3.0, help="time budget per batch-1 cell")
    ap.add_argument("--seconds-b8", type=float, default=6.0, help="time budget per batch-8 cell")
    ap.add_argument("--kernel-seconds", type=float, default=1.0)
    ap.add_argument("--runtimes", nargs="*", default=RUNTIMES + LOWP_RUNTIMES, choices=RUNTIMES + LOWP_RUNTIMES,
                    help="the runtimes (rows) to measure; default all")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--rounds-f32", type=int, default=4,
                    help="rounds of visenc f32 and ONNX Runtime f32 (the f32 targets' pair), alternating")
    ap.add_argument("--rounds", type=int, default=2,
                    help="measurements per cell, runtimes in alternating order; each cell keeps its fastest")
    ap.add_argument("--quiet-cores", type=float, default=0.25,
                    help="wait until other processes use less CPU than this before each measurement")
    ap.add_argument("--max-wait", type=float, default=20.0, help="longest wait for quiet before one measurement")
    ap.add_argument("--max-total-wait", type=float, default=180.0, help="longest total wait for quiet")
    ap.add_argument("--retry-budget", type=float, default=300.0,
                    help="seconds for measuring again, at the end, the cells disturbed by other processes")
    ap.add_argument("--nice", type=int, default=-10,
                    help="niceness increment of the measured processes (negative needs root; 0 to keep)")
    ap.add_argument("--force", action="store_true", help="rebuild the cached models and ONNX files")
    # worker options
    ap.add_argument("--runtime", choices=["ort", "ort-int8", "torch", "torch-bf16"])
    ap.add_argument("--workload", choices=list(WORKLOADS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--min-iters", type=int, default=3)
    ap.add_argument("--iters", type=int)
    ap.add_argument("--check-input")
    ap.add_argument("--check-output")
    a = ap.parse_args(argv)
    a.argv = argv
    a.cache = os.path.abspath(a.cache)
    if a.mode == "prepare":
        prepare(a.cache, a.force)
    elif a.mode == "worker":
        worker(a)
    elif a.mode == "torch-kernels":
        torch_kernels(a)
    elif a.mode == "render":
        render(a)
    elif a.mode == "retry":
        retry(a)
    else:
        if not os.path.exists(a.visenc):
            sys.exit(f"{a.visenc} not found: cargo build --release -p visenc-cli")
        if a.force:
            subprocess.run([PY, os.path.abspath(__file__), "prepare", "--cache", a.cache, "--force"], check=True)
        measure(a)


if __name__ == "__main__":
    main()
