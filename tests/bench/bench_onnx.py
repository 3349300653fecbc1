"""ONNX Runtime vs torch for extraction (the billion-scale extraction line): the shipped default model
under torch fp32 against its own ONNX export run by onnxruntime (fp32, int8 dynamic, int8 static),
images/s side by side in one run, and how far their descriptors move.

    SPARK_LOCAL_IP=127.0.0.1 nice -n 10 .venv/bin/python tests/bench/bench_onnx.py \
        [--out /tmp/bench_onnx] [--threads 1,2] [--rounds 5] [--timing-images 128] [--batch 32]

then the quality change on the copy set (one bench_quality run per variant: the --set applies to all of
its stages; ``--reuse`` keeps each configuration's rows in --work):

    .venv/bin/python tests/bench/bench_quality.py --data /work/quality_data --split test --work /tmp/bq_onnx \
        --configs ort_fp32=/tmp/bench_onnx/heads-fp32.pt \
        --set model.backbone=onnx --set model.backbone_weights=/tmp/bench_onnx/backbone-fp32.onnx
    (the same with int8_dynamic / int8_static; the script prints the exact lines)

What is exported: the part that dominates the cost, backbone (MobileNetV2 trunk) + GeM, as a
float32 N x 3 x H x W (ImageNet-normalised) -> N x 1280 model with dynamic N, H, W (opset 17, the
TorchScript-based exporter ``dynamo=False``: the dynamo exporter needs ``onnxscript``). That file is
exactly what ``model.backbone=onnx`` loads (retrieval/model/external.py), so the ONNX variants run
through the project's own extraction code path: ``model_from_config`` with ``model.backbone=onnx``,
``model.backbone_weights=<file>`` and ``model.checkpoint=<heads .pt>``, where the .pt holds the shipped
model's trained heads + whitening (unchanged) on top of the file. The whole gallery forward
(image -> 128-d coarse + 512-d fine, normalisation included) is also exported and timed as a bare
onnxruntime session (``ort fp32 whole``), to show what the torch heads cost around the ONNX trunk.

int8: ``quantize_dynamic`` (weights int8 offline, activations quantised per batch at run time; convs
become ConvInteger) and ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations with
ranges calibrated on 64 images: random crops of scikit-image's bundled photos, never the quality set
nor any wallpaper / tuxpaint package), both after onnxruntime's ``quant_pre_process``. Calibration
``percentile`` (99.999) by default: of minmax, entropy and percentile (also with the first / last conv
left in fp32) it kept the descriptors closest to torch fp32 on the agreement images (fine cosine mean
0.939 vs 0.908 for minmax and entropy).

Timing: the same preprocessed 224 px batches (the real sample photos and their copies, decoded by the
pipeline's ``prepare``), batch = extract.batch_size, every variant through
``retrieval.model.task.encode`` (torch.inference_mode, gallery role) except ``ort fp32 whole``
(bare session.run) and ``torch fp32 channels_last`` (the same torch model in channels-last memory
format, a torch-side alternative, for reference); per thread count (torch.set_num_threads, which also
sizes the onnxruntime sessions, as extraction does: a Spark task gets spark.task.cpus threads, 1 by
default = the plan's per-core rate), the variants alternate in ``--rounds`` rounds (order rotated
each round); median, min-max and the median of the per-round ratio to torch fp32 are reported.

Agreement: ~200 images (the sample's 41 gallery photos, 3 copies of each, 30 unrelated photos):
max abs difference and cosine of the 128-d and 512-d outputs against torch fp32 (gallery role, and the
query role's R_lo coarse code), and on the sample's retrieval task (copies + unrelated photos as queries
against the 41 photos) the share of queries whose top-1 neighbour is the same as torch fp32's, and each
variant's recall@1.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import random
import shutil
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from retrieval import config  # noqa: E402
from retrieval.model.task import encode  # noqa: E402
from retrieval.model.checkpoints import model_from_config, save_checkpoint  # noqa: E402
from retrieval.model.network import DescriptorModel  # noqa: E402
from retrieval.extract.preprocess import prepare  # noqa: E402
from retrieval.sample import SKIMAGE_PHOTOS, make_sample  # noqa: E402

VARIANTS = ("fp32", "int8_dynamic", "int8_static")


# ---------------------------------------------------------------------------------------------
# export
class Trunk(torch.nn.Module):
    """backbone + GeM on an ImageNet-normalised float32 batch (model.backbone=onnx, float_nchw)."""

    def __init__(self, m: DescriptorModel) -> None:
        super().__init__()
        self.backbone, self.pool = m.backbone, m.pool

    def forward(self, x):
        return self.pool(self.backbone(x))


class Whole(torch.nn.Module):
    """The whole gallery forward: RGB in [0, 1] -> (coarse 128-d, fine 512-d), both normalised."""

    def __init__(self, m: DescriptorModel) -> None:
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m.encode_gallery(x)


def export(module: torch.nn.Module, path: str, outputs: list[str], opset: int) -> None:
    axes = {"images": {0: "n", 2: "h", 3: "w"}, **{o: {0: "n"} for o in outputs}}
    torch.onnx.export(module.eval(), (torch.rand(2, 3, 224, 224),), path, dynamo=False, opset_version=opset,
                      input_names=["images"], output_names=outputs, dynamic_axes=axes)


def calibration_images(n: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` float [0, 1] 3 x size x size tensors: random crops (25-100% of the side), flips and
    squashes of scikit-image's bundled photos (decoded and resized by the pipeline's own prepare)."""
    import io

    import skimage.data
    from PIL import Image

    base = os.path.dirname(skimage.data.__file__)
    photos = [Image.open(os.path.join(base, p)).convert("RGB") for p in SKIMAGE_PHOTOS
              if os.path.exists(os.path.join(base, p))]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.25, 1.0)), int(h * rng.uniform(0.25, 1.0))
        x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = img.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        crop.save(buf, "PNG")
        (t,), _, _ = prepare(buf.getvalue(), (size,))
        out.append(t)
    return out


def quantize(fp32: str, out_dir: str, calib: list[torch.Tensor], mean, std, calibrate: str) -> dict[str, str]:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = os.path.join(out_dir, "backbone-fp32-pre.onnx")
    quant_pre_process(fp32, pre, skip_symbolic_shape=False)
    dyn = os.path.join(out_dir, "backbone-int8_dynamic.onnx")
    try:
        quantize_dynamic(pre, dyn, weight_type=QuantType.QInt8)
        import onnxruntime as ort
        ort.InferenceSession(dyn, providers=["CPUExecutionProvider"])
        dyn_note = "weights QInt8"
    except Exception as exc:   # ConvInteger has no s8-weight kernel in some onnxruntime builds
        print(f"quantize_dynamic QInt8: {exc.__class__.__name__}: {str(exc)[:160]}; using QUInt8 weights")
        quantize_dynamic(pre, dyn, weight_type=QuantType.QUInt8)
        dyn_note = "weights QUInt8"

    batches = [torch.stack(calib[i:i + 8]) for i in range(0, len(calib), 8)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"images": ((b - mean) / std).numpy()} for b in batches])

        def get_next(self):
            return next(self.it, None)

    sta = os.path.join(out_dir, "backbone-int8_static.onnx")
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[calibrate]
    quantize_static(pre, sta, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method)
    print(f"int8 dynamic: {dyn_note}; int8 static: QDQ, per-channel QInt8 weights, QUInt8 activations, "
          f"{calibrate} calibration on {len(calib)} images")
    return {"int8_dynamic": dyn, "int8_static": sta}


def heads_checkpoint(ref: DescriptorModel, onnx_path: str, ckpt: str) -> None:
    """The shipped model's heads (+ whitening) on top of the ONNX file: a full checkpoint that
    ``model.backbone=onnx`` + ``model.backbone_weights=onnx_path`` + ``model.checkpoint=ckpt`` loads."""
    from retrieval.model.external import load_external

    s = ref.spec
    trunk = load_external("onnx", onnx_path, "auto", (s.size_hi, s.size_lo))
    spec = dataclasses.replace(s, backbone="onnx", gem_p=0.0, channels=trunk.dim, backbone_sha256=trunk.sha256,
                               input_layout=trunk.layout,
                               extra={"backbone_file": onnx_path, "exported_from": ref.model_version()})
    m = DescriptorModel(spec, trunk)
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith(("backbone.", "pool."))}
    m.load_state_dict(sd, strict=True)
    save_checkpoint(m, ckpt)


def onnx_model(out: str, variant: str) -> DescriptorModel:
    cfg = config.load(sets=["model.backbone=onnx", f"model.backbone_weights={out}/backbone-{variant}.onnx",
                            f"model.checkpoint={out}/heads-{variant}.pt"])
    return model_from_config(cfg["model"].to_dict(), cfg["preprocess"].to_dict())


# ---------------------------------------------------------------------------------------------
def decode(files: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    hi, lo = [], []
    for f in files:
        with open(f, "rb") as fh:
            (h, l_), _, _ = prepare(fh.read(), (224, 160))
        hi.append(h)
        lo.append(l_)
    return hi, lo


def cos_stats(a: np.ndarray, b: np.ndarray) -> str:
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return f"max|d| {np.abs(a - b).max():.2e}  cos min {cos.min():.6f} mean {cos.mean():.6f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/bench_onnx")
    ap.add_argument("--threads", default="1,2", help="comma list of torch / onnxruntime thread counts")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--timing-images", type=int, default=128)
    ap.add_argument("--batch", type=int, default=0, help="0 = extract.batch_size of the default config")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--calibrate", default="percentile", choices=("minmax", "percentile", "entropy"))
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort
    import torchvision

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    isa = ",".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags)
    print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}; CPU {cpu} "
          f"x {os.cpu_count()} ({isa}); load average {os.getloadavg()[0]:.2f}")
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    cfg = config.load()
    batch = args.batch or cfg.extract.batch_size
    ref = model_from_config(cfg["model"].to_dict(), cfg["preprocess"].to_dict())
    print(f"default model {ref.model_version()} ({ref.spec.backbone}, whiten {ref.spec.whiten}); batch {batch}")

    # -- export + quantise ---------------------------------------------------------------------
    t = time.perf_counter()
    paths = {"fp32": os.path.join(args.out, "backbone-fp32.onnx")}
    export(Trunk(ref), paths["fp32"], ["embedding"], args.opset)
    whole = os.path.join(args.out, "whole-fp32.onnx")
    export(Whole(ref), whole, ["coarse", "fine"], args.opset)
    print(f"exported (opset {args.opset}, dynamic N/H/W) in {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    calib = calibration_images(args.calibration, 224)
    paths.update(quantize(paths["fp32"], args.out, calib, ref.mean, ref.std, args.calibrate))
    print(f"quantised in {time.perf_counter() - t:.1f}s")
    for v in VARIANTS:
        heads_checkpoint(ref, paths[v], os.path.join(args.out, f"heads-{v}.pt"))
    for p in [*paths.values(), whole]:
        print(f"  {os.path.basename(p)}: {os.path.getsize(p) / 1e6:.1f} MB")

    # -- data ----------------------------------------------------------------------------------
    s = make_sample(os.path.join(args.out, "sample"), copies_per_image=3, n_distractors=30)
    g_files = sorted(os.path.join(s["gallery"], f) for f in os.listdir(s["gallery"]))
    q_files = sorted(os.path.join(s["queries"], f) for f in os.listdir(s["queries"]))
    g_hi, g_lo = decode(g_files)
    q_hi, q_lo = decode(q_files)
    all_hi = g_hi + q_hi
    timing = [all_hi[i % len(all_hi)] for i in range(args.timing_images)]
    timing_batches = [timing[i:i + batch] for i in range(0, len(timing), batch)]
    print(f"images: {len(g_files)} gallery photos + {len(q_files)} queries (copies + unrelated photos) = "
          f"{len(all_hi)} for agreement; {len(timing)} of them ({len(timing_batches)} batches) per timing; "
          f"calibration: {len(calib)} crops of {len(SKIMAGE_PHOTOS)} scikit-image photos")

    # -- agreement (4 threads irrelevant: 1 thread, deterministic) -----------------------------
    torch.set_num_threads(1)
    models = {"torch fp32": ref, **{f"ort {v}": onnx_model(args.out, v) for v in VARIANTS}}
    sess_whole = ort.InferenceSession(whole, providers=["CPUExecutionProvider"])
    outs = {}
    for name, m in models.items():
        gc, gf = encode(m, "gallery", g_hi, [], "cpu")
        qc, qf = encode(m, "query", q_hi, q_lo, "cpu")
        ac, af = encode(m, "gallery", q_hi, [], "cpu")
        outs[name] = dict(gc=gc, gf=gf, qc=qc, qf=qf, ac=ac, af=af)
    wc, wf = [], []
    for i in range(0, len(all_hi), batch):
        c, f = sess_whole.run(None, {"images": torch.stack(all_hi[i:i + batch]).numpy()})
        wc.append(c)
        wf.append(f)
    ng = len(g_hi)
    outs["ort fp32 whole"] = dict(gc=np.concatenate(wc)[:ng], gf=np.concatenate(wf)[:ng],
                                  ac=np.concatenate(wc)[ng:], af=np.concatenate(wf)[ng:])
    truth = {os.path.basename(q): os.path.basename(q)[5:].rsplit("_", 1)[0] for q in q_files
             if os.path.basename(q).startswith("copy_")}
    g_stem = [os.path.splitext(os.path.basename(g))[0] for g in g_files]
    r = outs["torch fp32"]
    top1_ref = np.argmax(r["qf"] @ r["gf"].T, axis=1)
    ctop1_ref = np.argmax(r["qc"] @ r["gc"].T, axis=1)
    print(f"\n### agreement with torch fp32 on {len(all_hi)} images (gallery role: coarse = adapter 1 at 224 px, "
          f"fine 512-d; query coarse = adapter 2 at 160 px)\n")
    print("| variant | coarse 128-d (gallery) | fine 512-d | query coarse 128-d (R_lo) | top-1 same (fine) | "
          "top-1 same (query coarse) | recall@1 fine (copies) |")
    print("|---|---|---|---|---:|---:|---:|")
    names = [os.path.basename(q) for q in q_files]
    for name, o in outs.items():
        c = np.concatenate([o["gc"], o["ac"]])
        f = np.concatenate([o["gf"], o["af"]])
        row = [cos_stats(c, np.concatenate([r["gc"], r["ac"]])), cos_stats(f, np.concatenate([r["gf"], r["af"]]))]
        if "qc" in o:
            row.append(cos_stats(o["qc"], r["qc"]))
            top1 = np.argmax(o["qf"] @ o["gf"].T, axis=1)
            ctop1 = np.argmax(o["qc"] @ o["gc"].T, axis=1)
            rec = np.mean([g_stem[top1[i]] == truth[n] for i, n in enumerate(names) if n in truth])
            row += [f"{np.mean(top1 == top1_ref):.3f}", f"{np.mean(ctop1 == ctop1_ref):.3f}", f"{rec:.3f}"]
        else:
            row += ["-", "-", "-", "-"]
        print(f"| {name} | " + " | ".join(row) + " |")

    # -- speed -----------------------------------------------------------------------------------
    for threads in [int(x) for x in args.threads.split(",")]:
        torch.set_num_threads(threads)   # onnxruntime sessions take torch.get_num_threads() at creation
        models = {"torch fp32": ref, **{f"ort {v}": onnx_model(args.out, v) for v in VARIANTS}}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sw = ort.InferenceSession(whole, sess_options=opts, providers=["CPUExecutionProvider"])
        np_batches = [torch.stack(b).numpy() for b in timing_batches]

        def run_whole() -> None:
            for b in np_batches:
                sw.run(None, {"images": b})

        fns = {name: (lambda m=m: [encode(m, "gallery", b, [], "cpu") for b in timing_batches])
               for name, m in models.items()}
        fns["ort fp32 whole"] = run_whole
        cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)   # a torch-side alternative (reference)

        def run_channels_last() -> None:
            with torch.inference_mode():
                for b in timing_batches:
                    c, f = cl.encode_gallery(torch.stack(b).contiguous(memory_format=torch.channels_last))
                    c.numpy(), f.numpy()

        fns["torch fp32 channels_last"] = run_channels_last
        for fn in fns.values():   # warm-up
            fn()
        rates: dict[str, list[float]] = {k: [] for k in fns}
        order = list(fns)
        t0 = time.perf_counter()
        for rnd in range(args.rounds):
            for name in order[rnd % len(order):] + order[:rnd % len(order)]:
                t = time.perf_counter()
                fns[name]()
                rates[name].append(len(timing) / (time.perf_counter() - t))
        print(f"\n### images/s, {threads} thread(s), batch {batch}, 224 px gallery forward, {args.rounds} rounds "
              f"x {len(timing)} images alternated ({time.perf_counter() - t0:.0f}s; load average now "
              f"{os.getloadavg()[0]:.2f})\n")
        print("| variant | median img/s | min-max | per-round | x torch fp32 (median of per-round ratios) |")
        print("|---|---:|---|---|---:|")
        for name, v in rates.items():
            ratio = statistics.median(a / b for a, b in zip(v, rates["torch fp32"]))
            print(f"| {name} | {statistics.median(v):.1f} | {min(v):.1f}-{max(v):.1f} | "
                  f"{' '.join(f'{x:.1f}' for x in v)} | {ratio:.2f} |")

    print("\nquality (one run per variant; rows of the default model: --configs default without --set):")
    for v in VARIANTS:
        print(f"  SPARK_LOCAL_IP=127.0.0.1 nice -n 10 .venv/bin/python tests/bench/bench_quality.py --data "
              f"/work/quality_data --split test --work /tmp/bq_onnx --reuse --configs ort_{v}={args.out}/heads-{v}.pt "
              f"--set model.backbone=onnx --set model.backbone_weights={args.out}/backbone-{v}.onnx")


if __name__ == "__main__":
    main()
