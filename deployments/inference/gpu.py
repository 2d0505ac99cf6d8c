"""ONNX Runtime on GPUs (no Ray): which providers a session gets, TensorRT's optimization
profile and engine-cache key, the model input they are computed from (read without
parsing the weights), and the CUDA and TensorRT libraries ORT must find loaded."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import mmap
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from graph.common.errors import ModelLoadError

logger = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

# A TensorRT engine is built for batches up to this many 640×640 images (fewer of larger
# ones: TensorRT sizes its memory for the profile's largest shape); larger batches run
# in parts. Tuned for TRT_OPT_BATCH: the README's `max_batch_size` for GPU nodes is 8-16.
TRT_MAX_BATCH = 32
TRT_MAX_PIXELS = TRT_MAX_BATCH * 640 * 640
TRT_OPT_BATCH = 8
# ONNX Runtime 1.31's TensorRT provider links TensorRT 10 (CUDA 13 build).
NVINFER = "libnvinfer.so.10"
NVONNXPARSER = "libnvonnxparser.so.10"
TENSORRT_WHEEL = "tensorrt-cu13-libs"


def gpu_present() -> bool:
    """True when an NVIDIA device node exists (cheap; no CUDA initialisation)."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def choose_providers(
    available: Sequence[str],
    gpu: bool,
    trt_cache_dir: Path | None,
    fp16: bool = True,
    trt_options: Mapping[str, str] | None = None,
) -> list[str | tuple[str, dict[str, Any]]]:
    """TensorRT (engine cache; `trt_options`: its profile and cache prefix, see
    `trt_profile_shapes` and `model_digest`) → CUDA → CPU, keeping only what is present;
    GPU providers only when a GPU is (onnxruntime-gpu lists them on CPU-only machines)."""
    chosen: list[str | tuple[str, dict[str, Any]]] = []
    if gpu and TENSORRT in available and trt_cache_dir is not None:
        chosen.append(
            (
                TENSORRT,
                {
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(trt_cache_dir),
                    "trt_timing_cache_enable": True,
                    "trt_timing_cache_path": str(trt_cache_dir),
                    "trt_fp16_enable": fp16,
                    **(trt_options or {}),
                },
            )
        )
    if gpu and CUDA in available:
        chosen.append(CUDA)
    chosen.append(CPU)
    return chosen


# ---- the model's input, from the ONNX protobuf without its weights -------------------

MODEL_GRAPH, GRAPH_INITIALIZER, GRAPH_INPUT, TENSOR_NAME = 7, 5, 11, 8


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, value start, value end) of each length-delimited field of a
    protobuf message; other wire types are skipped."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise ValueError("a field runs past its message")
            yield field, pos, pos + length
            pos += length
        else:
            raise ValueError(f"wire type {wire}")
    if pos != end:
        raise ValueError("a field runs past its message")


def model_inputs(path: Path) -> list[tuple[str, list[int | str]]]:
    """A model's inputs (initializers listed as inputs left out): each one's name and dims
    (an int where fixed, else the dim's name). Read from the file's protobuf fields,
    mapped, without parsing the weights (an archive's model can be gigabytes, and
    parsing holds the GIL)."""
    from onnx import ValueInfoProto

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                inputs: list[Any] = []
                initialized: set[str] = set()
                for field, start, end in _fields(buf, 0, len(buf)):
                    if field != MODEL_GRAPH:
                        continue
                    for item, s, e in _fields(buf, start, end):
                        if item == GRAPH_INPUT:
                            inputs.append(ValueInfoProto.FromString(bytes(buf[s:e])))
                        elif item == GRAPH_INITIALIZER:
                            # Its name only: the weights' fields are not read past it.
                            name = next(
                                (f for f in _fields(buf, s, e) if f[0] == TENSOR_NAME), None
                            )
                            if name is not None:
                                raw = bytes(buf[name[1] : name[2]])
                                initialized.add(raw.decode(errors="surrogateescape"))
            finally:
                buf.release()
    except Exception as exc:  # OSError, ValueError (an empty file too), protobuf's errors
        raise ModelLoadError(f"cannot load {path.name}: {exc}") from exc
    if any(not isinstance(value.name, str) for value in inputs):
        raise ModelLoadError(f"{path.name}: an input's name is not UTF-8")
    return [
        (
            value.name,
            [
                d.dim_value if d.HasField("dim_value") else d.dim_param
                for d in value.type.tensor_type.shape.dim
            ],
        )
        for value in inputs
        if value.name not in initialized
    ]


# ---- TensorRT ---------------------------------------------------------------------------


def writable_name(name: str) -> bool:
    """Whether an input name can stand in a profile option: ORT splits its entries at
    ',' and a name from its shape at ':', and a NUL ends the C string."""
    return bool(name) and name.isprintable() and "," not in name and ":" not in name


def trt_profile_shapes(
    name: str, dims: Sequence[int | str], imgsz: int, max_batch: int = TRT_MAX_BATCH
) -> dict[str, str]:
    """TensorRT's optimization profile for a detector input: batches 1 to `max_batch`
    (fewer at larger sides, `TRT_MAX_PIXELS`), tuned for `TRT_OPT_BATCH`, at the model's
    own sides or the square `imgsz` (what GPU replicas are fed). Without one, ONNX
    Runtime's TensorRT provider sizes the profile by the shapes seen so far and builds
    the engine again, minutes on the replica's event loop, each time a larger batch
    comes. Empty where every dim is fixed (none is needed) or the name cannot be written
    (`writable_name`; `load_engine` then leaves TensorRT out)."""
    if len(dims) != 4 or all(isinstance(d, int) and d > 0 for d in dims):
        return {}
    if not writable_name(name):
        return {}

    def fixed(dim: int | str, default: int) -> int:
        return dim if isinstance(dim, int) and dim > 0 else default

    batch, channels, height, width = dims
    c, h, w = fixed(channels, 3), fixed(height, imgsz), fixed(width, imgsz)
    if isinstance(batch, int) and batch > 0:
        low = opt = high = batch
    else:
        high = max(1, min(max_batch, TRT_MAX_PIXELS // (h * w)))
        low, opt = 1, min(high, TRT_OPT_BATCH)

    def shape(n: int) -> str:
        return f"{name}:{n}x{c}x{h}x{w}"

    return {
        "trt_profile_min_shapes": shape(low),
        "trt_profile_opt_shapes": shape(opt),
        "trt_profile_max_shapes": shape(high),
    }


def profile_max_batch(profile: Mapping[str, str]) -> int | None:
    """The largest batch a profile admits (None: no profile)."""
    shape = profile.get("trt_profile_max_shapes")
    return int(shape.rsplit(":", 1)[1].split("x", 1)[0]) if shape else None


def model_digest(path: Path, *build: str) -> str:
    """The engine cache's key for a model and what its engine is built with (`build`:
    the profile, the precision): ORT names cached engines by the graph's file name and
    structure, not its weights, so two archives' same-named exports of one architecture
    would share an engine (one of them running the other's weights), and one model at
    two profiles would rebuild over each other's engine at every load."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    for part in build:
        digest.update(b"\x00" + part.encode())
    return "m" + digest.hexdigest()[:24]


def trt_engine_cached(trt_cache_dir: Path | None, prefix: str = "") -> bool:
    return trt_cache_dir is not None and any(trt_cache_dir.glob(f"{prefix}*.engine"))


# ---- the libraries ORT must find loaded ------------------------------------------------

_lock = threading.Lock()
_cuda_preloaded = False
_tensorrt_loaded: bool | None = None


def preload_gpu_libraries(tensorrt: bool = False) -> bool:
    """Load CUDA and cuDNN from the `nvidia-*` wheels (torch's CUDA build brings them)
    and, with `tensorrt`, TensorRT, so that ORT's providers find them without a system
    CUDA toolkit. ORT looks for them only on the library path, or finds them loaded
    when torch was imported first, which a replica serving an ONNX model never does:
    without this its CUDA provider fails to load (`libcublasLt.so.13`) and the model
    runs on the CPU. Once per process, under a lock (models load in threads). Returns
    whether TensorRT's library is loaded (True when not asked)."""
    global _cuda_preloaded, _tensorrt_loaded
    with _lock:
        if not _cuda_preloaded:
            import onnxruntime as ort

            try:
                if hasattr(ort, "preload_dlls"):  # onnxruntime >= 1.21
                    ort.preload_dlls(directory="")  # nvidia site packages, then the default
            except Exception as exc:  # it raises only for a bad directory; never fatal here
                logger.warning("CUDA libraries not preloaded: %s", exc)
            _cuda_preloaded = True
        if tensorrt and _tensorrt_loaded is None:
            _tensorrt_loaded = _load_tensorrt()
        return bool(_tensorrt_loaded) if tensorrt else True


def _load_tensorrt() -> bool:
    """TensorRT 10 from the library path, else from the `tensorrt-cu13-libs` wheel (only
    that one: the CUDA 12 wheel ships the same module for another CUDA)."""
    if _sonames_load():
        return True
    import importlib.metadata
    import importlib.util

    try:
        importlib.metadata.version(TENSORRT_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        logger.info("TensorRT not found (%s, or `pip install %s`)", NVINFER, TENSORRT_WHEEL)
        return False
    spec = importlib.util.find_spec("tensorrt_libs")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in map(Path, folders):
        # The builder opens its resource library by name when it builds an engine.
        stems = ("libnvinfer.so", "libnvinfer_builder_resource.so", "libnvinfer_plugin.so")
        for stem in (*stems, "libnvonnxparser.so"):
            for lib in sorted(folder.glob(f"{stem}.*")):
                try:
                    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
                except OSError as exc:
                    logger.warning("TensorRT library %s not loaded: %s", lib.name, exc)
    if _sonames_load():  # found now by their sonames
        return True
    logger.warning("TensorRT not loaded from %s", TENSORRT_WHEEL)
    return False


def _sonames_load() -> bool:
    """Whether TensorRT and its ONNX parser (both linked by ORT's provider) load."""
    try:
        for soname in (NVINFER, NVONNXPARSER):
            ctypes.CDLL(soname, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    return True
