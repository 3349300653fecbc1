"""Decoding at the model's speed (issue 25 item 2): decode, resize and inference per image, old vs new side
by side in one run, on the bundled sample and on 1-12 MP photos (JPEG, plus PNG and WebP).

    SPARK_LOCAL_IP=127.0.0.1 .venv/bin/python tests/bench/bench_decode.py [--out /tmp/bench_decode] \
        [--rounds 3] [--per-size 60] [--lossless-per-size 30] [--no-stages] [--no-local] [--no-spark] \
        [--sets sample,jpeg,png,webp]

old = the 0.2 default: ``preprocess.decoder: pillow`` (Pillow decode with draft + Pillow resize), decoding
inline between forwards (``extract.decode_threads: 0``), ``model.runtime: torch``. new = today's defaults
(``model.runtime: auto``: onnxruntime fp32 on a CPU, the ONNX file made by the driver; ``preprocess.decoder:
fast``: simplejpeg at Pillow's DCT scale, torchvision.io for PNG / WebP, torch's uint8 antialiased resize;
``extract.decode_threads: auto``).

1. Stages, per image, in CPU milliseconds of the calling thread (``time.thread_time``: on a shared,
   loaded machine wall time measures the neighbours; CPU time is what a core spends), best of
   ``--rounds`` alternated rounds: decode (to pixels), resize (to the gallery's 224 px float tensor;
   the query role's 224 + 160 also), inference (batch 32, one thread, gallery and query role). Per set:
   the sample (its gallery + queries: small JPEG / PNG / WebP), and the large photos by format and size.
   img/s per core = 1000 / (decode + resize + inference) ms.
2. The extraction job (``--engine local``, ``extract.threads: 1``), per configuration, alternated rounds:
   wall img/s, and the task's CPU ms per image (the shards' ``cpu_s``: every thread of the process,
   decode threads included, after the model setup) = images per CPU-second, the per-core rate.
3. The Spark job (local[2]: two tasks of one core, one shard each), old vs new on the same images,
   alternated rounds with warm workers (a first tiny job starts them; its cost is printed): wall img/s
   per core (the job's run, median of rounds) and the tasks' CPU per image as in 2; then the fixed cost
   of a job (a tiny one, warm workers), which a short job does not amortise.

Large photos (timing only): real photos that the quality benchmark's Debian packages ship (never a
reserved wallpaper/background package nor tuxpaint), cropped at varying offsets (4:3 and 3:4; upscaled only
where the source is smaller) to 1, 2, 4, 8 and 12 MP, ``--per-size`` of each, saved as JPEG q90 4:2:0;
``--lossless-per-size`` at 1 and 4 MP also as PNG and WebP q90. Without those packages, scikit-image's
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
SOURCES = [Q + "/texlive-pictures-doc/usr/share/doc/texlive-doc/latex/xput/koepi.jpg",
           Q + "/texlive-latex-extra-doc/usr/share/doc/texlive-doc/latex/willowtreebook/willow.jpg",
           Q + "/kstars-data/usr/share/kstars/geomap.jpg",
           Q + "/kstars-data/usr/share/kstars/kstarslite/qml/images/splash_bg@4x.jpeg",
           Q + "/texlive-fonts-extra-doc/usr/share/doc/texlive-doc/fonts/aboensis/doc/pics/SDHK27022.jpg",
           Q + "/texlive-latex-extra-doc/usr/share/doc/texlive-doc/latex/bookshelf/myshelf.jpg",
           Q + "/texlive-publishers-doc/usr/share/doc/texlive-doc/latex/mlacls/mla-example-image.jpg",
           Q + "/texlive-publishers-doc/usr/share/doc/texlive-doc/latex/ftc-notebook/src/images/robocracy2018.jpg"]
SIZES_MP = (1, 2, 4, 8, 12)
LOSSLESS_MP = (1, 4)
S_HI, S_LO = 224, 160


def make_large(out: str, sources: list[str], per_size: int, lossless_per_size: int) -> str:
    """``per_size`` JPEGs (q90, 4:2:0) per size of SIZES_MP, ``lossless_per_size`` PNGs and WebPs (q90) per
    size of LOSSLESS_MP, in ``out``/jpeg, /png, /webp: crops of the sources at different offsets, 4:3 or
    3:4 (a source smaller than the crop is upscaled first); the origin of the photos (a line)."""
    srcs = [s for s in sources if os.path.exists(s)]
    origin = f"{len(srcs)} quality-source photos"
    if not srcs:
        import skimage.data

        base = os.path.dirname(skimage.data.__file__)
        srcs = [os.path.join(base, n) for n in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")]
        origin = "scikit-image photos, upscaled (the quality sources are not unpacked here)"
    stamp = os.path.join(out, f".made-{per_size}-{lossless_per_size}-{len(srcs)}")
    if os.path.exists(stamp):
        return origin
    shutil.rmtree(out, ignore_errors=True)
    for sub in ("jpeg", "png", "webp"):
        os.makedirs(os.path.join(out, sub))
    images = [Image.open(s).convert("RGB") for s in srcs]
    for mp in SIZES_MP:
        for k in range(max(per_size, lossless_per_size if mp in LOSSLESS_MP else 0)):
            x = _crop(images[k % len(images)], mp, k)
            name = f"p{k:03d}_{mp:02d}mp"
            if k < per_size:
                x.save(os.path.join(out, "jpeg", name + ".jpg"), quality=90)
            if mp in LOSSLESS_MP and k < lossless_per_size:
                x.save(os.path.join(out, "png", name + ".png"))
                x.save(os.path.join(out, "webp", name + ".webp"), quality=90)
    open(stamp, "w").close()
    return origin


def _crop(im: Image.Image, mp: int, k: int) -> Image.Image:
    """The k-th mp-megapixel crop of ``im`` (4:3, every third 3:4; offsets vary with k)."""
    tw = int((mp * 1e6 * 4 / 3) ** 0.5)
    th = int(mp * 1e6 / tw)
    if k % 3 == 1:
        tw, th = th, tw
    w, h = im.size
    if tw > w or th > h:
        s = max(tw / w, th / h)
        im = im.resize((int(w * s) + 1, int(h * s) + 1), Image.LANCZOS)
        w, h = im.size
    x0, y0 = int((w - tw) * ((k * 37) % 11) / 10), int((h - th) * ((k * 53) % 7) / 6)
    return im.crop((x0, y0, x0 + tw, y0 + th))


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
JOB_CONFIGS = {   # name -> --set values; the first is the baseline, the last the defaults of today
    "0.2 default (pillow, inline, torch)": {"preprocess.decoder": "pillow", "extract.decode_threads": 0,
                                            "model.runtime": "torch"},
    "onnx + pillow inline": {"preprocess.decoder": "pillow", "extract.decode_threads": 0},
    "onnx + fast inline": {"preprocess.decoder": "fast", "extract.decode_threads": 0},
    "new default (auto: onnx, fast, threads)": {},
}
BASE, NEW = "0.2 default (pillow, inline, torch)", "new default (auto: onnx, fast, threads)"


def job_cfg(sets: dict, threads: int, shards: int):
    sets = {**sets, "extract.threads": threads, "extract.num_shards": shards, "extract.mode": "overwrite",
            "extract.storage": "int8", "extract.progress_seconds": 600}
    return config.load(sets=[f"{k}={v}" for k, v in sets.items()])


def run_jobs(inputs: dict[str, str], out: str, rounds: int, engine, threads: int, shards: int,
             configs: dict[str, dict]) -> dict:
    """Per input set and configuration, per round: (task CPU s per image: the shards' ``cpu_s``, every
    thread of the task's process after its model setup; wall img/s of the job's run; images; the slowest
    shard's model setup s; the job's run s); configurations alternate within each round (order rotated)."""
    from retrieval.extract.job import extract

    res: dict = {}
    names = list(configs)
    for set_name, inp in inputs.items():
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                dest = os.path.join(out, "jobs", f"{set_name}-{names.index(name)}")
                m = extract(inp, dest, job_cfg(configs[name], threads, shards), engine)
                n = m["counts"]["ok"] + m["counts"]["errors"]
                cpu = sum(sh["cpu_s"] for sh in m["shards"])
                setup = max(sh["setup_s"] for sh in m["shards"])
                res.setdefault((set_name, name), []).append((cpu / n, m["timings"]["images_per_s"], n, setup,
                                                             m["timings"]["run_s"]))
    return res


def print_jobs(title: str, res: dict, cores: int) -> dict:
    """Median over rounds: wall img/s per core and images per task CPU-second, each as x the baseline."""
    print(f"\n{title}")
    base: dict = {}
    ratios = {}
    for (set_name, name), rows in res.items():
        cpu_ms = statistics.median(r[0] for r in rows) * 1e3
        ips = statistics.median(r[1] for r in rows) / cores
        b = base.setdefault(set_name, (cpu_ms, ips))       # the first configuration listed is the baseline
        ratios[(set_name, name)] = (ips / b[1], b[0] / cpu_ms)
        print(f"  {set_name:<12} {name:<40} n={rows[0][2]:<4} wall {ips:6.1f} img/s/core ({ips / b[1]:4.2f}x)  "
              f"task CPU {cpu_ms:6.1f} ms/img = {1e3 / cpu_ms:6.1f} img per CPU-s ({b[0] / cpu_ms:4.2f}x)  "
              f"[rounds wall: {', '.join(f'{r[1] / cores:.1f}' for r in rows)}; model setup s: "
              f"{', '.join(f'{r[3]:.1f}' for r in rows)}]", flush=True)
    return ratios


def print_mix(res: dict, sets: tuple[str, ...]) -> None:
    """All the large photos together (every JPEG, PNG and WebP above, each counted once): task CPU per
    image = the sets' CPU seconds over their images, per configuration."""
    total: dict[str, list[float]] = {}
    for (set_name, name), rows in res.items():
        if set_name in sets:
            t = total.setdefault(name, [0.0, 0.0])
            t[0] += statistics.median(r[0] for r in rows) * rows[0][2]
            t[1] += rows[0][2]
    base = None
    for name, (cpu, n) in total.items():
        base = base or cpu / n
        print(f"  {'large, all':<12} {name:<40} n={int(n):<4} task CPU {cpu / n * 1e3:6.1f} ms/img = "
              f"{n / cpu:6.1f} img per CPU-s ({base / (cpu / n):4.2f}x)", flush=True)


def fixed_costs(sample_dir: str, out: str, engine, configs: dict[str, dict], rounds: int, cold: bool) -> None:
    """A tiny job (8 images, two tasks): the job's fixed wall seconds (listing, planning, the tasks' start and
    commit) that the per-image rates do not count and a short job does not amortise; ``cold``: the first
    job of the session, whose Python workers start and build the model (once per worker process)."""
    tiny = os.path.join(out, "tiny")
    if not os.path.isdir(tiny):
        os.makedirs(tiny)
        for f in sorted(glob.glob(os.path.join(sample_dir, "gallery", "*.jpg")))[:8]:
            shutil.copy(f, tiny)
    res = run_jobs({"tiny": tiny}, out, rounds, engine, 1, 2, configs)
    for (_, name), rows in res.items():
        print(f"  {'first job, cold workers' if cold else 'fixed cost, warm workers'}: {name:<40} job run "
              f"{statistics.median(r[4] for r in rows):5.2f} s wall, model setup in its tasks "
              f"{statistics.median(r[3] for r in rows):5.2f} s", flush=True)


def stage_sets(sample_dir: str, large: str) -> dict[str, list[str]]:
    sets: dict[str, list[str]] = {"sample": sorted(glob.glob(sample_dir + "/*/*"))}
    for ext in ("jpg", "png", "webp"):
        sets[f"sample .{ext}"] = [f for f in sets["sample"] if f.endswith(ext)]
    jpeg = sorted(glob.glob(os.path.join(large, "jpeg", "*")))
    sets["1-12MP jpeg"] = jpeg
    for mp in SIZES_MP:
        sets[f"{mp}MP jpeg"] = [f for f in jpeg if f.endswith(f"_{mp:02d}mp.jpg")]
    for ext in ("png", "webp"):
        sets[f"1,4MP {ext}"] = sorted(glob.glob(os.path.join(large, ext, "*")))
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/bench_decode")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-size", type=int, default=60, help="JPEGs per size (1, 2, 4, 8, 12 MP)")
    ap.add_argument("--lossless-per-size", type=int, default=30, help="PNGs and WebPs per size (1, 4 MP)")
    ap.add_argument("--no-spark", action="store_true")
    ap.add_argument("--no-jobs", action="store_true")
    ap.add_argument("--no-local", action="store_true", help="no --engine local job (section 2)")
    ap.add_argument("--no-stages", action="store_true")
    ap.add_argument("--sources", nargs="*", default=SOURCES)
    ap.add_argument("--sets", default="sample,jpeg,png,webp", help="the jobs' input sets (sections 2 and 3)")
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
    large = os.path.join(args.out, "large")
    origin = make_large(large, args.sources, args.per_size, args.lossless_per_size)
    cfg = config.load()
    torch.set_num_threads(1)
    print(f"bench_decode: {os.cpu_count()} cores (a shared machine: CPU-time figures), torch {torch.__version__}, "
          f"simplejpeg {getattr(decoders.simplejpeg, '__version__', 'MISSING')}; large photos: {origin}", flush=True)
    if not args.no_stages:
        model = model_from_config({**cfg["model"].to_dict(), "runtime": "torch"}, cfg["preprocess"].to_dict()).eval()
        onnx_file = os.path.join(args.out, "model.onnx")
        export_onnx(model, onnx_file)
        om = model_from_config({**cfg["model"].to_dict(), "runtime": "onnx", "onnx_file": onnx_file},
                               cfg["preprocess"].to_dict()).eval()
        inf = inference_times({"torch": model, "onnx": om}, args.rounds)
        print("inference, CPU ms/image (1 thread, batch 32): " + ", ".join(f"{k} {v:.2f}" for k, v in inf.items()))
        print("\n1. stages, CPU ms/image of one thread (old -> new); img/s per core = 1000 / (decode + resize + "
              "inference)")
        for name, files in stage_sets(sample_dir, large).items():
            datas = [open(f, "rb").read() for f in files]
            print_stages(name, len(datas), stage_times(datas, args.rounds), inf)
    if args.no_jobs:
        return
    inputs = {"sample": sample_dir, "1-12MP jpeg": os.path.join(large, "jpeg"),
              "1,4MP png": os.path.join(large, "png"), "1,4MP webp": os.path.join(large, "webp")}
    inputs = {k: v for k, v in inputs.items() if os.path.basename(v) in args.sets.split(",")}   # sample, jpeg, ...
    if not args.no_local:
        res = run_jobs(inputs, args.out, args.rounds, None, 1, 2, JOB_CONFIGS)
        print_jobs("2. extraction job, --engine local, extract.threads 1 (one core); task CPU = this process, "
                   "all threads", res, 1)
    if not args.no_spark:
        from retrieval.engine.session import get_spark

        spark = get_spark("local[2]", "bench-decode", {"spark.ui.enabled": "false"})
        spark_cfgs = {k: JOB_CONFIGS[k] for k in (BASE, NEW)}
        print("\n3. Spark job, local[2] (2 tasks x 1 core, one shard each)")
        fixed_costs(sample_dir, args.out, spark, spark_cfgs, 1, True)      # starts the workers: not counted below
        res3 = run_jobs(inputs, args.out, args.rounds, spark, 1, 2, spark_cfgs)
        print_jobs("   per core, warm workers; task CPU = the Python worker's CPU seconds after the model setup",
                   res3, 2)
        print_mix(res3, ("1-12MP jpeg", "1,4MP png", "1,4MP webp"))
        fixed_costs(sample_dir, args.out, spark, spark_cfgs, args.rounds, False)
        spark.stop()


if __name__ == "__main__":
    main()
