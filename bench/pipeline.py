#!/usr/bin/env python3
"""End-to-end benchmark: `visenc embed DIR` over a folder of JPEGs against PIL + torchvision transforms
(a torch DataLoader with worker processes) feeding ONNX Runtime, the fastest peer model run
(bench/compare.py), on the same weights.

    /work/pyref/bin/python bench/pipeline.py [--only efficientnet_b0 clip-vit-b16-224] [--n 240]

What one run does, one measurement at a time:

1. makes --n JPEGs (quality 90) in a temporary folder (or --images, kept): random crops of the real photos in
   assets/photos, rescaled to camera-like sizes from 640x480 to 1600x1200, landscape and portrait (seeded).
2. for each workload (models and ONNX graphs from bench/compare.py's cache; `compare.py` prepares them):
     visenc  `visenc embed --model CKPT DIR --out x.npy --batch 8 --quiet`, RAYON_NUM_THREADS=2
     peer    PIL decode + the checkpoint's own transforms in torchvision (timm's `create_transform` from the
             checkpoint's pretrained_cfg; for CLIP, Resize(shortest 224, bicubic) + CenterCrop + Normalize as
             CLIPImageProcessor), a DataLoader (batch 8, --peer-workers worker processes each), then an
             onnxruntime session with intra_op_num_threads=2 (as compare.py's `ort`)
   Each runs in a fresh process that prints one JSON line per image as it goes (visenc's default output);
   the steady rate counts the images after the first batch over the time from the first batch's lines to
   the last, which leaves out start-up (process, imports, model load, the pipeline's fill) on both sides.
   Whole-process wall time and peak RSS (ru_maxrss of the child) are reported too.
3. checks that both computed the same thing: per-image cosine of visenc's embeddings to the peer's (the
   decoders and resamplers differ slightly, so a cosine near 1, not bit equality, is expected).
4. prints a Markdown table and writes --out (JSON).

The machine is shared: each measurement waits (bounded) for other processes to leave the cores and
records their load during the run, as compare.py does.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import compare  # noqa: E402  (the shared workload table, cache layout and load helpers)

SIZES = [(640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200), (1200, 1600), (768, 1024),
         (480, 640)]
BATCH = 8


def make_images(folder, n, seed):
    """n JPEGs cropped and rescaled from the real photos (deterministic for a seed)."""
    from PIL import Image

    photos = sorted(glob.glob(os.path.join(compare.ROOT, "assets", "photos", "*")))
    if not photos:
        sys.exit("bench/pipeline.py: no photos in assets/photos (run ./scripts/fetch-assets.sh)")
    src = [Image.open(p).convert("RGB") for p in photos]
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        im = src[i % len(src)]
        w, h = im.size
        f = rng.uniform(0.6, 1.0)
        cw, ch = int(w * f), int(h * f)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        tw, th = SIZES[int(rng.integers(0, len(SIZES)))]
        im.crop((x, y, x + cw, y + ch)).resize((tw, th), Image.BICUBIC).save(
            os.path.join(folder, f"img_{i:04d}.jpg"), quality=90)


def peer_transform(workload, cache):
    """The checkpoint's preprocessing as PIL + torchvision transforms."""
    from torchvision import transforms as T

    spec = compare.WORKLOADS[workload]
    d = compare.ckpt_dir(cache, workload)
    if spec["kind"] == "clip":
        with open(os.path.join(d, "preprocessor_config.json")) as f:
            p = json.load(f)
        crop = p["crop_size"]["height"]
        return T.Compose([T.Resize(p["size"]["shortest_edge"], interpolation=T.InterpolationMode.BICUBIC),
                          T.CenterCrop(crop), T.ToTensor(), T.Normalize(p["image_mean"], p["image_std"])])
    import timm
    from timm.data import create_transform, resolve_data_config

    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)["pretrained_cfg"]
    return create_transform(**resolve_data_config(pretrained_cfg=cfg), is_training=False)


def peer(a):
    """One peer run (its own process): DataLoader(PIL + torchvision) -> onnxruntime, embeddings to --emb."""
    import onnxruntime as ort
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    files = sorted(glob.glob(os.path.join(a.images, "*.jpg")))[: a.limit]
    tf = peer_transform(a.workload, a.cache)

    class Folder(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            with Image.open(files[i]) as im:
                return tf(im.convert("RGB"))

    so = ort.SessionOptions()
    so.intra_op_num_threads = compare.THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(compare.onnx_path(a.cache, a.workload), so, providers=["CPUExecutionProvider"])
    loader = torch.utils.data.DataLoader(Folder(), batch_size=BATCH, num_workers=a.workers,
                                         persistent_workers=False, prefetch_factor=2 if a.workers else None)
    i = 0
    for x in loader:
        for e in sess.run(None, {"pixel_values": x.numpy()})[0]:
            print(json.dumps({"path": files[i], "embedding": e.tolist()}))
            i += 1
        sys.stdout.flush()


def run_child(cmd, env=None):
    """Runs cmd, which prints one JSON line per image ({"path", "embedding"}) as it goes. Returns the
    embeddings, when each line arrived (seconds from the start), the child's peak RSS (MiB, ru_maxrss) and
    other processes' load (cores) over the run."""
    hz = os.sysconf("SC_CLK_TCK")
    b0, _ = compare.cpu_busy_jiffies()
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    emb, arrived = [], []
    for line in p.stdout:
        arrived.append(time.perf_counter() - t)
        emb.append(json.loads(line)["embedding"])
    err = p.stderr.read().decode(errors="replace")
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    b1, _ = compare.cpu_busy_jiffies()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench/pipeline.py: {' '.join(cmd)} failed:\n{err}")
    own = ru.ru_utime + ru.ru_stime
    other = max(0.0, (b1 - b0) / hz - own) / wall
    return np.array(emb, dtype=np.float32), arrived, wall, ru.ru_maxrss / 1024.0, other


def wait_quiet(a):
    waited = 0.0
    while waited < a.max_wait and compare.other_load(1.0) > a.quiet_cores:
        waited += 1.0
    return waited


def measure(a, name, cmd, env=None):
    """Runs one side; the steady rate counts the images after the first batch over the time from the
    first batch's output to the last (start-up, model load and the pipeline's fill excluded for both)."""
    wait_quiet(a)
    emb, arrived, wall, rss, other = run_child(cmd, env)
    if len(arrived) != a.n:
        sys.exit(f"bench/pipeline.py: {name} wrote {len(arrived)} embeddings for {a.n} images")
    steady = (a.n - BATCH) / max(1e-9, arrived[-1] - arrived[BATCH - 1])
    print(f"  {name}: {a.n} images, first batch out after {arrived[BATCH - 1]:.1f} s, steady {steady:.2f} "
          f"img/s, whole process {wall:.1f} s, peak RSS {rss:.0f} MiB, other load {other:.2f} cores",
          file=sys.stderr)
    return emb, dict(steady_img_per_s=steady, whole_img_per_s=a.n / wall, wall_s=wall,
                     first_batch_s=arrived[BATCH - 1], peak_rss_mib=rss, other_load_cores=other)


def cosines(x, y):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    return (x * y).sum(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "peer"])
    ap.add_argument("--cache", default=os.environ.get("VISENC_BENCH_CACHE", "/work/bench-models"))
    ap.add_argument("--visenc", default=os.path.join(compare.ROOT, "target", "release", "visenc"))
    ap.add_argument("--only", nargs="*", default=["efficientnet_b0", "clip-vit-b16-224"],
                    choices=list(compare.WORKLOADS))
    ap.add_argument("--n", type=int, default=240, help="images in the full run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", help="folder for the generated JPEGs (kept); default: a temporary one")
    ap.add_argument("--peer-workers", type=int, nargs="*", default=[2],
                    help="DataLoader worker processes to try; the fastest is the peer")
    ap.add_argument("--visenc-precision", default="f32", choices=["f32", "bf16", "int8"])
    ap.add_argument("--quiet-cores", type=float, default=0.25)
    ap.add_argument("--max-wait", type=float, default=20.0)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "pipeline.json"))
    # peer worker arguments
    ap.add_argument("--workload", choices=list(compare.WORKLOADS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int)
    a = ap.parse_args()
    if a.mode == "peer":
        return peer(a)

    from PIL import Image

    if not os.path.exists(a.visenc):
        sys.exit(f"bench/pipeline.py: no visenc binary at {a.visenc} (cargo build --release -p visenc-cli)")
    tmp = tempfile.mkdtemp(prefix="visenc-pipeline-")
    try:
        a.images = a.images or os.path.join(tmp, "images")
        if len(glob.glob(os.path.join(a.images, "*.jpg"))) != a.n:
            shutil.rmtree(a.images, ignore_errors=True)
            t = time.time()
            make_images(a.images, a.n, a.seed)
            print(f"made {a.n} JPEGs in {a.images} ({time.time() - t:.1f} s)", file=sys.stderr)
        files = sorted(glob.glob(os.path.join(a.images, "*.jpg")))
        mpix = np.mean([np.prod(Image.open(f).size) for f in files]) / 1e6
        env = dict(os.environ, RAYON_NUM_THREADS=str(compare.THREADS))
        results = dict(n=a.n, mean_megapixels=mpix, batch=BATCH, threads=compare.THREADS,
                       visenc_precision=a.visenc_precision, workloads={})
        for w in a.only:
            print(f"{w}:", file=sys.stderr)
            cmd = [a.visenc, "embed", "--model", compare.ckpt_dir(a.cache, w), a.images, "--batch", str(BATCH),
                   "--quiet", "--precision", a.visenc_precision]
            emb, r = measure(a, "visenc", cmd, env)
            r = dict(visenc=r, peers={})
            best = None
            for k in a.peer_workers:
                cmd = [compare.PY, os.path.abspath(__file__), "peer", "--cache", a.cache, "--workload", w,
                       "--images", a.images, "--limit", str(a.n), "--workers", str(k)]
                pe, r["peers"][k] = measure(a, f"peer ({k} workers)", cmd)
                if best is None or r["peers"][k]["steady_img_per_s"] > r["peers"][best]["steady_img_per_s"]:
                    best, best_emb = k, pe
            r["peer_workers"] = best
            p = r["peers"][best]
            cos = cosines(emb, best_emb)
            r["cosine_min"], r["cosine_mean"] = float(cos.min()), float(cos.mean())
            r["ratio_steady"] = r["visenc"]["steady_img_per_s"] / p["steady_img_per_s"]
            r["ratio_whole"] = r["visenc"]["whole_img_per_s"] / p["whole_img_per_s"]
            results["workloads"][w] = r
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
        print(table(results))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def table(res):
    lines = [f"{res['n']} JPEGs (mean {res['mean_megapixels']:.2f} MP), batch {res['batch']}, "
             f"{res['threads']} threads; steady img/s: images after the first batch / time from its output to the last.",
             "",
             f"| workload | visenc embed ({res['visenc_precision']}) | PIL + torchvision + ORT | visenc/peer "
             "| whole process: visenc / peer img/s | peak RSS visenc / peer MiB (largest process) "
             "| cosine visenc vs peer (min / mean) |",
             "|---|---|---|---|---|---|---|"]
    for w, r in res["workloads"].items():
        v, p = r["visenc"], r["peers"][r["peer_workers"]]
        load = max(v["other_load_cores"], p["other_load_cores"])
        flag = " †" if load > 0.3 else ""
        lines.append(
            f"| {compare.WORKLOADS[w]['title']}{flag} | {v['steady_img_per_s']:.2f} img/s | "
            f"{p['steady_img_per_s']:.2f} ({r['peer_workers']} workers) | **{r['ratio_steady']:.2f}x** | "
            f"{v['whole_img_per_s']:.2f} / {p['whole_img_per_s']:.2f} ({r['ratio_whole']:.2f}x) | "
            f"{v['peak_rss_mib']:.0f} / {p['peak_rss_mib']:.0f} | "
            f"{r['cosine_min']:.5f} / {r['cosine_mean']:.5f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
