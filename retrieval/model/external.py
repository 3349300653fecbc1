"""The user's own descriptor model as the backbone: a TorchScript or ONNX file that maps an image batch
to an embedding (``model.backbone: torchscript | onnx``, ``model.backbone_weights: URL``).

The embedding (N x K) is the base feature: it replaces backbone + GeM, and the heads of
:class:`~retrieval.model.network.DescriptorModel` sit on top of it. The file is frozen (inference
only, no autograd through it) and never enters a checkpoint: its sha256 does (``ModelSpec.backbone_sha256``,
part of ``model_version``), and loading a checkpoint needs the same file again.

Input layouts (``model.input_layout``): ``float_nchw`` (float32 N x 3 x H x W, ImageNet mean/std
normalised RGB) and ``uint8_nhwc`` (uint8 N x H x W x 3, RGB 0..255). ``auto`` reads the ONNX input
signature (uint8 -> uint8_nhwc, float -> float_nchw); TorchScript has no typed signature: float_nchw.

Runtimes are per process: the TorchScript module and the onnxruntime sessions are held outside the
module tree (no state_dict entries) and dropped when the object is pickled; they are (re)created
lazily from the file, whose sha256 is verified again. An onnxruntime session uses
``torch.get_num_threads()`` intra-op threads at its creation, and the CUDA execution provider when
the model sits on a CUDA device and the provider exists.

The model file is code as much as weights (TorchScript especially): use files you trust.
"""
from __future__ import annotations

import hashlib
import io
import logging
import warnings
import zipfile
from typing import Any

import numpy as np
import torch
from torch import nn

from retrieval import fsio
from retrieval.model.common import IMAGENET_MEAN, IMAGENET_STD, ModelError

log = logging.getLogger(__name__)

KINDS = ("torchscript", "onnx")
LAYOUTS = ("float_nchw", "uint8_nhwc")
_ONNX_TYPES = {"tensor(float)": "float", "tensor(uint8)": "uint8"}


def _describe(data: bytes) -> str:
    """What a file that is not the expected model looks like (for the error message)."""
    if data[:3] == b"\xff\xd8\xff":
        return "a JPEG image"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "a PNG image"
    if data[:4] == b"PK\x03\x04":
        try:
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except zipfile.BadZipFile:
            return "a damaged zip archive"
        if any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in names):
            return "a TorchScript archive (use model.backbone=torchscript)"
        if any(n.endswith("data.pkl") for n in names):
            return "a torch.save file (a state_dict or a pickled module), not a model file"
        return "a zip archive"
    if data[:1] == b"\x80":
        return "a pickle file (legacy torch.save?), not TorchScript"
    return f"{len(data)} bytes starting {data[:8]!r}"


def read_model_file(url: str) -> tuple[bytes, str]:
    """The bytes of the model file and their sha256."""
    if not url or url in ("default", "none") or url.isupper():
        raise ModelError(f"an external backbone (torchscript / onnx) needs model.backbone_weights = the "
                         f"model file's path or fsspec URL, not {url!r}")
    try:
        data = fsio.read_bytes(url)
    except FileNotFoundError:
        raise ModelError(f"model file not found: {url} (model.backbone_weights)") from None
    except IsADirectoryError:
        raise ModelError(f"model file {url} is a directory (model.backbone_weights)") from None
    if not data:
        raise ModelError(f"model file {url} is empty")
    return data, hashlib.sha256(data).hexdigest()


def _load_torchscript(data: bytes, url: str) -> torch.jit.ScriptModule:
    names: list[str] = []
    if data[:4] == b"PK\x03\x04":
        try:
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except zipfile.BadZipFile:
            pass
    if not any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in names):
        raise ModelError(f"{url}: not a TorchScript model file: it is {_describe(data)}"
                         + (" (an ONNX model? use model.backbone=onnx)" if data[:1] == b"\x08" else
                            "; save a model with torch.jit.script(model).save(path) or "
                            "torch.jit.trace(model, example).save(path)"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # torch.jit.load's deprecation notice
            net = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:
        raise ModelError(f"{url}: not a loadable TorchScript model ({_short(exc)})") from None
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise ModelError("model.backbone=onnx needs onnxruntime: pip install 'retrieval[onnx]'") from None
    return onnxruntime


def _onnx_session(data: bytes, url: str, device: torch.device):
    """A new onnxruntime session (CUDA provider for a CUDA device when available, else CPU)."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        else:
            log.warning("%s: the model runs on %s but onnxruntime has no CUDAExecutionProvider "
                        "(pip install onnxruntime-gpu): the ONNX model runs on the CPU", url, device)
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=providers)
    except Exception as exc:
        raise ModelError(f"{url}: not a loadable ONNX model: it is {_describe(data)} ({_short(exc)})") from None


def _short(exc: Exception) -> str:
    """One line of an exception (TorchScript's are multi-line tracebacks: their last line says it)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{exc.__class__.__name__}: {(lines[-1] if lines else '')[:300]}"


def _dim(d: Any) -> int | None:
    return d if isinstance(d, int) and not isinstance(d, bool) and d > 0 else None


def _onnx_layout(sess, url: str, layout: str, sizes: tuple[int, ...]) -> tuple[str, int]:
    """Check the ONNX signature; returns (layout, fixed batch size or 0)."""
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1:
        raise ModelError(f"{url}: the ONNX model has {len(inputs)} inputs "
                         f"({', '.join(i.name for i in inputs)}); expected one image batch")
    inp = inputs[0]
    shape = list(inp.shape or [])
    sig = f"input {inp.name!r}: {inp.type} {shape}"
    if len(shape) != 4:
        raise ModelError(f"{url}: {sig} is not rank 4; expected an image batch N x 3 x H x W "
                         "(float) or N x H x W x 3 (uint8)")
    elem = _ONNX_TYPES.get(inp.type)
    if elem is None:
        raise ModelError(f"{url}: {sig}: element type {inp.type} is not supported (float32 N x 3 x H x W "
                         "or uint8 N x H x W x 3)")
    second, last = _dim(shape[1]), _dim(shape[3])   # None: a dynamic (named) axis
    if 3 not in (second, last) and None not in (second, last):
        raise ModelError(f"{url}: {sig} has no axis of 3 channels (second or last)")
    if layout == "auto":
        # the channel axis: the one that is 3; when neither is fixed, the usual one for the type
        channels_last = last == 3 if (second == 3) != (last == 3) else elem == "uint8"
        layout = {("uint8", True): "uint8_nhwc", ("float", False): "float_nchw"}.get((elem, channels_last), "")
        if not layout:
            raise ModelError(f"{url}: {sig}: a {elem} input with its channels "
                             f"{'last' if channels_last else 'second'} is not a supported layout "
                             "(float32 N x 3 x H x W = float_nchw, uint8 N x H x W x 3 = uint8_nhwc)")
    want_elem, axis = ("float", 1) if layout == "float_nchw" else ("uint8", 3)
    if elem != want_elem:
        raise ModelError(f"{url}: model.input_layout={layout} but the ONNX {sig} is not "
                         f"{'float32 N x 3 x H x W' if layout == 'float_nchw' else 'uint8 N x H x W x 3'}")
    if _dim(shape[axis]) not in (3, None):
        raise ModelError(f"{url}: {sig} has {shape[axis]} channels on its {'second' if axis == 1 else 'last'} "
                         f"axis ({layout}); expected 3 (RGB)")
    hw = (shape[2], shape[3]) if layout == "float_nchw" else (shape[1], shape[2])
    for s in sizes:
        for d in hw:
            if _dim(d) is not None and d != s:
                raise ModelError(f"{url}: {sig} has a fixed image size {hw[0]} x {hw[1]}, but the pipeline "
                                 f"feeds {' and '.join(f'{x} x {x}' for x in sizes)} (preprocess.size_hi / "
                                 "size_lo): export the model with dynamic H and W axes, or set those sizes")
    batch = _dim(shape[0]) or 0
    if batch > 1:
        raise ModelError(f"{url}: {sig} has a fixed batch size {batch}: export it with a dynamic batch axis "
                         "(or batch 1)")
    out = outputs[0]
    if out.shape is not None and len(out.shape) != 2:
        raise ModelError(f"{url}: output {out.name!r} has shape {list(out.shape)}; expected N x K (2-D)")
    if out.type not in ("tensor(float)", "tensor(float16)", "tensor(double)"):
        raise ModelError(f"{url}: output {out.name!r} has element type {out.type}; expected float")
    return layout, batch


class ExternalBackbone(nn.Module):
    """A frozen TorchScript / ONNX embedding model: ``forward(x)``: float RGB in [0, 1],
    N x 3 x H x W -> float32 N x K on the model's device. No parameters, no state_dict entries."""

    def __init__(self, kind: str, url: str, sha256: str, layout: str, dim: int = 0,
                 fixed_batch: int = 0) -> None:
        super().__init__()
        self.kind, self.url, self.sha256, self.layout = kind, url, sha256, layout
        self.dim, self.fixed_batch = int(dim), int(fixed_batch)
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)   # follows .to(device)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._drop_runtime()

    def _drop_runtime(self) -> None:
        # plain attributes (object.__setattr__): not submodules, so never in state_dict / parameters()
        object.__setattr__(self, "_net", None)
        object.__setattr__(self, "_net_device", None)
        object.__setattr__(self, "_data", None)
        object.__setattr__(self, "_sessions", {})

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()     # never pickle a session or a loaded TorchScript module
        state.update(_net=None, _net_device=None, _data=None, _sessions={})
        return state

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.url}, sha256={self.sha256[:12]}, layout={self.layout}, K={self.dim}"

    # -- runtime --------------------------------------------------------------------------------
    def _bytes(self) -> bytes:
        if self._data is not None:
            return self._data
        data, digest = read_model_file(self.url)
        if digest != self.sha256:
            raise ModelError(f"model file {self.url} changed since the model was built: sha256 {digest} "
                             f"!= {self.sha256}")
        return data

    def _script(self, device: torch.device):
        if self._net is None:
            object.__setattr__(self, "_net", _load_torchscript(self._bytes(), self.url))
        if self._net_device != device:
            self._net.to(device)
            object.__setattr__(self, "_net_device", device)
        return self._net

    def _session(self, device: torch.device):
        key = str(device) if device.type == "cuda" else "cpu"
        if key not in self._sessions:
            data = self._bytes()
            self._sessions[key] = _onnx_session(data, self.url, device)
            if self.kind == "onnx" and self._data is None:
                object.__setattr__(self, "_data", data)   # for a session on another device
        return self._sessions[key]

    # -- encoding -------------------------------------------------------------------------------
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The pipeline's batch (float RGB in [0, 1], N x 3 x H x W) in the model's input layout."""
        if self.layout == "uint8_nhwc":
            return torch.round(x.float() * 255.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        # the same arithmetic as (x - mean) / std, dividing in place: a second batch-sized tensor (19 MB at 32 x
        # 224 px) cost ~0.6 ms per image in fresh pages (bench_decode's profile of a task)
        return torch.sub(x.float(), self.mean.to(x.device)).div_(self.std.to(x.device)).contiguous()

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for the pipeline batch ``x`` (float32, on the model's device), unchecked."""
        device = self._anchor.device
        inp = self.prepare(x)
        if self.kind == "torchscript":
            out = self._script(device)(inp.to(device))
            if not isinstance(out, torch.Tensor):
                raise ModelError(f"{self.url}: the TorchScript model returned {type(out).__name__}; "
                                 "expected one tensor N x K")
            return out.float().to(device)
        sess = self._session(device)
        name, arr = sess.get_inputs()[0].name, inp.detach().cpu().numpy()
        if self.fixed_batch == 1:
            out = np.concatenate([sess.run(None, {name: arr[i:i + 1]})[0] for i in range(len(arr))])
        else:
            out = sess.run(None, {name: arr})[0]
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(device)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.raw(x)
        if out.ndim != 2 or out.shape[0] != x.shape[0] or (self.dim and out.shape[1] != self.dim):
            raise ModelError(f"{self.url}: the model mapped a batch of {x.shape[0]} images to "
                             f"{tuple(out.shape)}; expected {x.shape[0]} x {self.dim or 'K'}")
        return out


def _kind_layout(kind: str, layout: str) -> str:
    """Check ``model.backbone`` / ``model.input_layout``; TorchScript's ``auto`` is ``float_nchw``."""
    if kind not in KINDS:
        raise ModelError(f"unknown external backbone {kind!r}; choose one of {', '.join(KINDS)}")
    if layout not in ("auto", *LAYOUTS):
        raise ModelError(f"model.input_layout={layout!r}: choose auto, {', '.join(LAYOUTS)}")
    if kind == "torchscript" and layout == "auto":
        layout = "float_nchw"   # TorchScript has no typed signature
    return layout


def _static_k(sess) -> int | None:
    """The embedding width an ONNX model declares (None: a dynamic axis)."""
    return _dim((sess.get_outputs()[0].shape or [None, None])[-1])


def check_model_file(url: str, expect_sha256: str | None = None,
                     checkpoint: str | None = None) -> tuple[bytes, str]:
    """The model file's bytes and sha256; ``expect_sha256``: refuse a file whose sha256 differs (the
    file a checkpoint was made with)."""
    data, digest = read_model_file(url)
    if expect_sha256 is not None and digest != expect_sha256:
        raise ModelError(f"checkpoint {checkpoint} was made with backbone file sha256 {expect_sha256}; "
                         f"model.backbone_weights={url} has {digest}")
    return data, digest


def external_identity(kind: str, url: str, layout: str = "auto",
                      sizes: tuple[int, ...] = (224,)) -> tuple[str, str, int]:
    """``(sha256, layout, K)`` of a model file, what :func:`load_external` finds (the identity of a
    model on it: :mod:`retrieval.model.version`). An ONNX file that declares its output width is read
    from its signature, without running it; otherwise (TorchScript has no typed signature) K comes from
    :func:`load_external`'s one test forward of the file."""
    layout = _kind_layout(kind, layout)
    if kind == "onnx":
        data, digest = read_model_file(url)
        sess = _onnx_session(data, url, torch.device("cpu"))
        layout, _ = _onnx_layout(sess, url, layout, sizes)
        k = _static_k(sess)
        if k is not None:
            return digest, layout, k
    backbone = load_external(kind, url, layout, sizes)
    return backbone.sha256, backbone.layout, backbone.dim


def load_external(kind: str, url: str, layout: str = "auto", sizes: tuple[int, ...] = (224,),
                  expect_sha256: str | None = None, checkpoint: str | None = None) -> ExternalBackbone:
    """Open and check a model file: type, input signature, one test forward (batch of 2 at the smallest
    of ``sizes``) that must give N x K; returns the backbone with ``dim`` = K and the resolved layout.
    ``expect_sha256``: refuse a file whose sha256 differs (loading a checkpoint made with it)."""
    layout = _kind_layout(kind, layout)
    data, digest = check_model_file(url, expect_sha256, checkpoint)
    fixed_batch = 0
    if kind == "onnx":
        sess = _onnx_session(data, url, torch.device("cpu"))
        layout, fixed_batch = _onnx_layout(sess, url, layout, sizes)
        static_k = _static_k(sess)
    backbone = ExternalBackbone(kind, url, digest, layout, 0, fixed_batch)
    if kind == "onnx":
        backbone._sessions["cpu"] = sess
        object.__setattr__(backbone, "_data", data)
    else:
        object.__setattr__(backbone, "_net", _load_torchscript(data, url))
        object.__setattr__(backbone, "_net_device", torch.device("cpu"))
    n, size = (1 if fixed_batch == 1 else 2), min(sizes)
    probe = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        out = backbone.raw(probe)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{url}: a test forward of {n} x 3 x {size} x {size} images as {layout} failed "
                         f"({_short(exc)})"
                         + (": if the model takes uint8 N x H x W x 3, set model.input_layout=uint8_nhwc"
                            if kind == "torchscript" and layout == "float_nchw" else "")) from None
    if out.ndim != 2 or out.shape[0] != n:
        raise ModelError(f"{url}: the model maps a batch of {n} images to shape {tuple(out.shape)}; "
                         f"expected N x K (2-D, N = {n})")
    k = int(out.shape[1])
    if kind == "onnx" and static_k is not None and static_k != k:
        raise ModelError(f"{url}: the ONNX output declares {static_k} dims but gives {k}")
    if k < 1 or not torch.isfinite(out).all():
        raise ModelError(f"{url}: the test forward gave {'non-finite values' if k else 'an empty embedding'}")
    backbone.dim = k
    return backbone
