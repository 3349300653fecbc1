"""Decoding at the model's speed (issue 25 item 2): decode, resize and inference per image, old vs new side
by side in one run, on the bundled sample and on 1-12 MP photos (JPEG, plus PNG and WebP).

    SPARK_LOCAL_IP=127.0.0.1 .venv/bin/python tests/bench/bench_decode.py [--out /tmp/bench_decode] \
        [--rounds 3] [--no-spark] [--sources FILE ...]

old = ``preprocess.decoder: pillow`` (Pillow decode with draft + Pillow resize, decoding inline between
forwards) + the torch runtime: the 0.2 default. new = ``preprocess.decoder: fast`` (simplejpeg at
Pillow's DCT scale, torchvision.io for PNG / WebP, torch's uint8 antialiased resize) with decode threads
(``extract.decode_threads: auto``) + onnxruntime fp32 (``model.runtime: onnx`` on a file this script
exports: the onnx helper makes that the default).

1. Stages, per image, in CPU milliseconds of the calling thread (``time.thread_time``: on a shared,
   loaded machine wall time measures the neighbours; CPU time is what a core spends), best of
   ``--rounds`` alternated rounds: decode (to pixels), resize (to the gallery's 224 px float tensor;
   the query role's 224 + 160 also), inference (batch 32, one thread, gallery and query role). Per set:
   the sample (its gallery + queries: small JPEG / PNG / WebP), and the large photos by format and size.
   img/s per core = 1000 / (decode + resize + inference) ms.
2. The extraction job (``--engine local``, one model thread, ``extract.threads: 1``), per
   configuration, alternated rounds: CPU seconds per image of the whole process (decode threads included)
   = images per CPU-second, the per-core rate; and wall img/s.
3. The Spark job (local[2]: two tasks of one core), old vs new, wall img/s per core (median of rounds).

Large photos (timing only): real photos that the quality benchmark's Debian packages ship (never a
reserved wallpaper/background package nor tuxpaint), centre-cropped (or upscaled) to 1, 2, 4, 8 and 12 MP
and saved as JPEG q90 4:2:0; 1 and 4 MP also as PNG and WebP q90. Without those packages, scikit-image's
photos upscaled stand in (the output says so).
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import sys
import time

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from retrieval import config  # noqa: E402
from retrieval.extract import decoders  # noqa: E402
from retrieval.extract.preprocess import decode_image, decode_pixels, resize, to_tensor  # noqa: E402
from retrieval.model.task import encode  # noqa: E402

Q = "/var/cache/quality-sources"
SOURCES = [Q + "/texlive-latex-extra-doc/usr/share/doc/texlive-doc/latex/willowtreebook/willow.jpg",
           Q + "/texlive-publishers-doc/usr/share/doc/texlive-doc/latex/ftc-notebook/src/images/robocracy2018.jpg",
           Q + "/kstars-data/usr/share/kstars/kstarslite/qml/images/splash_bg@4x.jpeg",
           Q + "/texlive-latex-extra-doc/usr/share/doc/texlive-doc/latex/bookshelf/myshelf.jpg",
           Q + "/texlive-publishers-doc/usr/share/doc/texlive-doc/latex/mlacls/mla-example-image.jpg",
           Q + "/kstars-data/usr/share/kstars/geomap.jpg"]
SIZES_MP = (1, 2, 4, 8, 12)
LOSSLESS_MP = (1, 4)
S_HI, S_LO = 224, 160


def make_large(out: str, sources: list[str]) -> tuple[list[str], str]:
    os.makedirs(out, exist_ok=True)
    srcs = [s for s in sources if os.path.exists(s)]
    origin = "quality-source photos"
    if not srcs:
        import skimage.data

        base = os.path.dirname(skimage.data.__file__)
        srcs = [os.path.join(base, n) for n in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")]
        origin = "scikit-image photos, upscaled (the quality sources are not unpacked here)"
    files = []
    for i, s in enumerate(srcs):
        im = Image.open(s).convert("RGB")
        for mp in SIZES_MP:
            w, h = im.size
            tw = int((mp * 1e6 * w / h) ** 0.5)
            th = int(mp * 1e6 / tw)
            if tw <= w and th <= h:
                x = im.crop(((w - tw) // 2, (h - th) // 2, (w - tw) // 2 + tw, (h - th) // 2 + th))
            else:
                x = im.resize((tw, th), Image.LANCZOS)
            stem = os.path.join(out, f"p{i}_{mp:02d}mp")
            x.save(stem + ".jpg", quality=90)
            files.append(stem + ".jpg")
            if mp in LOSSLESS_MP:
                x.save(stem + ".png")
                x.save(stem + ".webp", quality=90)
                files += [stem + ".png", stem + ".webp"]
    return files, origin


# ---------------------------------------------------------------------------------------------
# 1. stages
def _cpu_ms(fn, items, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.thread_time()
        for x in items:
            fn(x)
        best = min(best, time.thread_time() - t)
    return best / max(1, len(items)) * 1e3


def _old_decode(d: bytes):
    return decode_image(d, draft_size=S_HI)[0]


def _new_decode(d: bytes):
    return decode_pixels(d, draft_size=S_HI)


def stage_times(datas: list[bytes], rounds: int) -> dict[str, float]:
    """CPU ms per image: decode and resize, old and new (alternated rounds, best of each)."""
    old_imgs = [_old_decode(d) for d in datas]
    new_px = [_new_decode(d) for d in datas]
    r: dict[str, list[float]] = {k: [] for k in ("dec_old", "dec_new", "rs_old", "rs_new", "rsq_old", "rsq_new")}
    for _ in range(rounds):
        r["dec_old"].append(_cpu_ms(_old_decode, datas, 1))
        r["dec_new"].append(_cpu_ms(_new_decode, datas, 1))
        r["rs_old"].append(_cpu_ms(lambda im: to_tensor(resize(im, S_HI)), old_imgs, 1))
        r["rs_new"].append(_cpu_ms(lambda p: decoders.resize_tensor(p[0], S_HI, "squash", p[3]), new_px, 1))
        r["rsq_old"].append(_cpu_ms(lambda im: [to_tensor(resize(im, s)) for s in (S_HI, S_LO)], old_imgs, 1))
        r["rsq_new"].append(_cpu_ms(lambda p: [decoders.resize_tensor(p[0], s, "squash", p[3]) for s in (S_HI, S_LO)],
                                    new_px, 1))
    return {k: min(v) for k, v in r.items()}


def inference_times(models: dict, rounds: int) -> dict[str, float]:
    """CPU ms per image of one thread, batch 32 (encode, as the job calls it)."""
    torch.set_num_threads(1)
    hi = [torch.rand(3, S_HI, S_HI) for _ in range(32)]
    lo = [torch.rand(3, S_LO, S_LO) for _ in range(32)]
    out = {}
    for name, m in models.items():
        for role in ("gallery", "query"):
            encode(m, role, hi, lo)
            out[f"{name}_{role}"] = min(_cpu_ms(lambda _: encode(m, role, hi, lo), [0], 1) for _ in range(rounds)) / 32
    return out


def print_stages(name: str, n: int, st: dict, inf: dict) -> dict:
    dec_x = st["dec_old"] / st["dec_new"]
    dr_old, dr_new = st["dec_old"] + st["rs_old"], st["dec_new"] + st["rs_new"]
    old = dr_old + inf["torch_gallery"]
    new = dr_new + inf["onnx_gallery"]
    newq = st["dec_new"] + st["rsq_new"] + inf["onnx_query"]
    oldq = st["dec_old"] + st["rsq_old"] + inf["torch_query"]
    print(f"  {name:<14} {n:>4}  decode {st['dec_old']:7.2f} -> {st['dec_new']:7.2f} ({dec_x:4.2f}x)  "
          f"resize {st['rs_old']:5.2f} -> {st['rs_new']:5.2f}  decode+resize {dr_old:7.2f} -> {dr_new:7.2f} "
          f"({dr_old / dr_new:4.2f}x; {1e3 / dr_old:6.1f} -> {1e3 / dr_new:6.1f} img/s)  "
          f"gallery img/s/core {1e3 / old:5.1f} -> {1e3 / new:5.1f} ({old / new:4.2f}x)  "
          f"query {1e3 / oldq:5.1f} -> {1e3 / newq:5.1f} ({oldq / newq:4.2f}x)  "
          f"[onnx + old decode: {old / (dr_old + inf['onnx_gallery']):4.2f}x]", flush=True)
    return {"old": old, "new": new, "onnx_old_decode": dr_old + inf["onnx_gallery"]}


# ---------------------------------------------------------------------------------------------
# 2-3. the extraction job
JOB_CONFIGS = {   # name -> --set values (model.onnx_file added for the onnx runtime)
    "today (pillow, inline, torch)": {"preprocess.decoder": "pillow", "extract.decode_threads": 0, "model.runtime": "torch"},
    "onnx + pillow inline": {"preprocess.decoder": "pillow", "extract.decode_threads": 0, "model.runtime": "onnx"},
    "onnx + fast inline": {"preprocess.decoder": "fast", "extract.decode_threads": 0, "model.runtime": "onnx"},
    "new (onnx + fast + decode threads)": {"preprocess.decoder": "fast", "extract.decode_threads": "auto",
                                           "model.runtime": "onnx"},
}


def job_cfg(sets: dict, onnx_file: str, threads: int):
    sets = {**sets, "extract.threads": threads, "extract.num_shards": 2, "extract.mode": "overwrite",
            "extract.storage": "int8", "extract.progress_seconds": 60}
    if sets["model.runtime"] == "onnx":
        sets["model.onnx_file"] = onnx_file
    return config.load(sets=[f"{k}={v}" for k, v in sets.items()])


def run_jobs(inputs: dict[str, str], out: str, onnx_file: str, rounds: int, engine, threads: int,
             configs: dict[str, dict]) -> dict:
    """Per input set and configuration: CPU s per image (this process, all threads) and wall img/s;
    configurations alternate within each round (order rotated)."""
    from retrieval.extract.job import extract

    res: dict = {}
    names = list(configs)
    for set_name, inp in inputs.items():
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                cfg = job_cfg(configs[name], onnx_file, threads)
                dest = os.path.join(out, "jobs", f"{set_name}-{abs(hash(name)) % 10**6}")
                c0 = time.process_time()
                m = extract(inp, dest, cfg, engine)
                cpu = time.process_time() - c0
                n = m["counts"]["ok"] + m["counts"]["errors"]
                res.setdefault((set_name, name), []).append((cpu / n, m["timings"]["images_per_s"], n))
    return res


def print_jobs(title: str, res: dict, per_core_div: int, cpu: bool) -> None:
    print(f"\n{title}")
    base: dict = {}
    for (set_name, name), rows in res.items():
        cpu_ms = statistics.median(r[0] for r in rows) * 1e3
        ips = statistics.median(r[1] for r in rows) / per_core_div
        if set_name not in base:      # the first configuration listed is the baseline
            base[set_name] = (cpu_ms, ips)
        b = base.get(set_name, (cpu_ms, ips))
        line = f"  {set_name:<8} {name:<38} n={rows[0][2]:<4} wall {ips:6.1f} img/s/core ({ips / b[1]:4.2f}x)"
        if cpu:
            line += f"  CPU {cpu_ms:6.1f} ms/img = {1e3 / cpu_ms:6.1f} img per CPU-s ({b[0] / cpu_ms:4.2f}x)"
        print(line + f"  [rounds: {', '.join(f'{r[1] / per_core_div:.1f}' for r in rows)}]", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/bench_decode")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-spark", action="store_true")
    ap.add_argument("--no-jobs", action="store_true")
    ap.add_argument("--no-stages", action="store_true")
    ap.add_argument("--sources", nargs="*", default=SOURCES)
    args = ap.parse_args()
    from retrieval.model.checkpoints import model_from_config
    from retrieval.model.onnx_runtime import export_onnx
    from retrieval.sample import make_sample

    os.makedirs(args.out, exist_ok=True)
    sample_dir = os.path.join(args.out, "sample")
    if not os.path.isdir(sample_dir):
        make_sample(os.path.join(args.out, "sample_src"))
        os.makedirs(sample_dir)
        for sub in ("gallery", "queries"):
            shutil.copytree(os.path.join(args.out, "sample_src", sub), os.path.join(sample_dir, sub))
    large_files, origin = make_large(os.path.join(args.out, "large"), args.sources)
    cfg = config.load()
    torch.set_num_threads(1)
    model = model_from_config(cfg["model"].to_dict(), cfg["preprocess"].to_dict()).eval()
    onnx_file = os.path.join(args.out, "model.onnx")
    export_onnx(model, onnx_file)
    om = model_from_config({**cfg["model"].to_dict(), "runtime": "onnx", "onnx_file": onnx_file},
                           cfg["preprocess"].to_dict()).eval()
    print(f"bench_decode: {os.cpu_count()} cores (a shared machine: CPU-time figures), torch {torch.__version__}, "
          f"simplejpeg {getattr(decoders.simplejpeg, '__version__', 'MISSING')}; large photos: {origin}")
    inf = inference_times({"torch": model, "onnx": om}, args.rounds)
    print("inference, CPU ms/image (1 thread, batch 32): " + ", ".join(f"{k} {v:.2f}" for k, v in inf.items()))
    print("\n1. stages, CPU ms/image of one thread (old -> new); img/s per core = 1000 / (decode + resize + inference)")
    sets: dict[str, list[str]] = {"sample": sorted(glob.glob(sample_dir + "/*/*"))}
    for ext in ("jpg", "png", "webp"):
        sets[f"sample .{ext}"] = [f for f in sets["sample"] if f.endswith(ext)]
    sets["1-12MP all"] = large_files
    sets["1-12MP jpg"] = [f for f in large_files if f.endswith(".jpg")]
    for mp in SIZES_MP:
        sets[f"{mp}MP jpg"] = [f for f in large_files if f.endswith(f"_{mp:02d}mp.jpg")]
    for ext in ("png", "webp"):
        sets[f"1,4MP {ext}"] = [f for f in large_files if f.endswith(ext)]
    for name, files in ({} if args.no_stages else sets).items():
        datas = [open(f, "rb").read() for f in files]
        print_stages(name, len(datas), stage_times(datas, args.rounds), inf)
    if args.no_jobs:
        return
    large_dir = os.path.join(args.out, "large")
    inputs = {"sample": sample_dir, "1-12MP": large_dir}
    res = run_jobs(inputs, args.out, onnx_file, args.rounds, None, 1, JOB_CONFIGS)
    print_jobs("2. extraction job, --engine local, extract.threads 1 (one core); CPU = this process, all threads",
               res, 1, True)
    two = {k: JOB_CONFIGS[k] for k in ("onnx + fast inline", "new (onnx + fast + decode threads)")}
    res2 = run_jobs(inputs, args.out, onnx_file, args.rounds, None, 2, two)
    print_jobs("   the same, extract.threads 2 (one task on two cores: where decode threads overlap most)", res2, 2, True)
    if not args.no_spark:
        from retrieval.engine.session import get_spark

        spark = get_spark("local[2]", "bench-decode", {"spark.ui.enabled": "false"})
        spark_cfgs = {k: JOB_CONFIGS[k] for k in ("today (pillow, inline, torch)", "new (onnx + fast + decode threads)")}
        res3 = run_jobs(inputs, args.out, onnx_file, args.rounds, spark, 1, spark_cfgs)
        print_jobs("3. Spark job, local[2] (2 tasks x 1 core), wall img/s per core", res3, 2, False)
        spark.stop()


if __name__ == "__main__":
    main()
