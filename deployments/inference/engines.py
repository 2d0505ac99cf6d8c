"""Inference engines (no Ray): ONNX Runtime with the best provider present, behind one
`detect(images, params)` call (`.pt` files are exported to ONNX once: `pt_models`); and
`ModelSlot`, the loading state machine that `/health` reports without ever triggering a
load."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from deployments.inference.gpu import (
    CUDA,
    TENSORRT,
    TRT_MAX_BATCH,
    choose_providers,
    gpu_present,
    model_digest,
    model_inputs,
    preload_gpu_libraries,
    profile_max_batch,
    trt_engine_cached,
    trt_profile_shapes,
)
from deployments.inference.pt_models import checked_yolo, pt_as_onnx
from graph.common.errors import InferenceError, ModelLoadError, ModelNotReadyError
from graph.common.vision import (
    RECT_STRIDE,
    DetectParams,
    decode_batch,
    stack_padded,
    to_model_input,
)

logger = logging.getLogger(__name__)


class Engine(Protocol):
    names: dict[int, str]
    imgsz: int
    providers: list[str]

    def batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Letterboxed images (sizes may differ) as one batch this model takes."""
        ...

    def detect(self, images: np.ndarray, params: Sequence[DetectParams]) -> list[np.ndarray]:
        """BxHxWx3 uint8 letterboxed BGR → per image (K, 6) x1 y1 x2 y2 conf cls."""
        ...


def parse_names(raw: str | None, nc: int) -> dict[int, str]:
    """Class names from Ultralytics' ONNX metadata (a dict literal), else numbered."""
    if raw:
        try:
            names = ast.literal_eval(raw)
            if isinstance(names, dict):
                return {int(k): str(v) for k, v in names.items()}
        except (ValueError, SyntaxError):
            logger.warning("ignoring unreadable class names metadata %r", raw[:80])
    return {i: f"class{i}" for i in range(nc)}


STRIDES = (32, 64, 128)


def parse_stride(raw: str | None, imgsz: int = 4096) -> int:
    """The model's largest stride from Ultralytics' ONNX metadata (32 for P5 models, 64
    for P6), which a dynamic input's sides must be multiples of: one of `STRIDES`, at
    most `imgsz`, else `RECT_STRIDE` (an archive's metadata is untrusted)."""
    try:
        stride = int(raw) if raw else RECT_STRIDE
    except ValueError:
        logger.warning("ignoring unreadable stride metadata %r", raw[:80] if raw else raw)
        stride = RECT_STRIDE
    return stride if stride in STRIDES and stride <= imgsz else RECT_STRIDE


def fixed_input_size(
    height: Any, width: Any, providers: Sequence[str], imgsz: int
) -> tuple[int, int] | None:
    """The one input size a model takes, or None when any multiple of its stride will do
    (a dynamic export on the CPU: frames come letterboxed to their own aspect ratio).
    On a GPU the square stays: TensorRT would build (and cache) an engine per shape,
    and CUDA runs cuDNN's algorithm search per new shape on the replica's event loop;
    padding costs a GPU little. Not measured on a GPU yet."""
    fixed = isinstance(height, int) or isinstance(width, int)
    return (imgsz, imgsz) if fixed or TENSORRT in providers or CUDA in providers else None


def check_image_input(name: str, shapes: Sequence[Sequence[Any]], imgsz: int) -> None:
    """ModelLoadError unless a detector's inputs are one NCHW image: 3 channels where
    fixed, fixed sides equal to `imgsz`, a fixed batch only of 1. `shapes`: each input's
    dims (ints where fixed)."""
    if len(shapes) != 1 or len(shapes[0]) != 4:
        raise ModelLoadError(f"{name}: expected one NCHW image input")
    batch_dim, channels, h, w = shapes[0]
    if channels not in (3, "3") and isinstance(channels, int):
        raise ModelLoadError(f"{name}: expected 3 input channels, got {channels}")
    for dim in (h, w):
        if isinstance(dim, int) and dim != imgsz:
            raise ModelLoadError(f"{name}: input is {h}x{w}, configured imgsz {imgsz}")
    if isinstance(batch_dim, int) and batch_dim != 1:
        raise ModelLoadError(
            f"{name}: fixed batch size {batch_dim}; export with a dynamic batch or 1"
        )


def make_session(
    path: Path,
    intra_op_threads: int,
    providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
) -> Any:
    """An ONNX Runtime session with camgraph's threading; load failures → ModelLoadError."""
    import onnxruntime as ort

    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, intra_op_threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if providers is None:
        providers = choose_providers(ort.get_available_providers(), gpu_present(), None)
    wanted = [p if isinstance(p, str) else p[0] for p in providers]
    if CUDA in wanted or TENSORRT in wanted:
        preload_gpu_libraries()
    try:
        session = ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        raise ModelLoadError(f"cannot load {path.name}: {exc}") from exc
    missing = [p for p in wanted if p not in session.get_providers()]
    if missing:
        # ORT falls back with a note on stderr only; /health lists the providers too.
        logger.warning(
            "%s: %s did not load or initialise (see the README's GPU notes); running on %s",
            path.name,
            ", ".join(missing),
            ", ".join(session.get_providers()),
        )
    return session


class OnnxEngine:
    """A YOLOv8/YOLO11 detection model in ONNX Runtime."""

    def __init__(
        self,
        path: Path,
        imgsz: int,
        intra_op_threads: int = 1,
        providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
        max_batch: int | None = None,
    ) -> None:
        """`max_batch`: the most images one session run takes (a TensorRT profile's
        ceiling); larger batches run in parts."""
        self._session = make_session(path, intra_op_threads, providers)
        self.providers = self._session.get_providers()
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        check_image_input(path.name, [i.shape for i in inputs], imgsz)
        self._input = inputs[0].name
        batch_dim, _, h, w = inputs[0].shape
        # A fixed batch is 1 here (others are refused above).
        self.max_batch = 1 if isinstance(batch_dim, int) else max_batch
        self.input_hw = fixed_input_size(h, w, self.providers, imgsz)
        self._output = outputs[0].name
        nc_dim = outputs[0].shape[1] if len(outputs[0].shape) == 3 else None
        meta = self._session.get_modelmeta().custom_metadata_map
        nc = nc_dim - 4 if isinstance(nc_dim, int) else 0
        self.names = parse_names(meta.get("names"), nc)
        self.imgsz = imgsz
        self.stride = parse_stride(meta.get("stride"), imgsz)
        if self.input_hw is None and not self._takes_rectangles(path.name):
            self.input_hw = (imgsz, imgsz)

    def _takes_rectangles(self, name: str) -> bool:
        """One probe at a 16:9 input: a model may name its height and width without
        taking other sizes than the square (constant anchors, a wrong stride)."""
        high = -(-round(self.imgsz * 9 / 16) // self.stride) * self.stride
        probe = np.full((1, min(high, self.imgsz), self.imgsz, 3), 114, np.uint8)
        try:
            raw = self._session.run([self._output], {self._input: to_model_input(probe)})[0]
            decode_batch(raw, [DetectParams()])
        except Exception as exc:  # ORT's own error types; a wrong output shape
            logger.warning("%s takes only %dx%d inputs (%s)", name, self.imgsz, self.imgsz, exc)
            return False
        return True

    def batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return stack_padded(images, self.input_hw, self.stride)

    def infer(self, images: np.ndarray) -> np.ndarray:
        """Raw model output (B, 4 + nc, N) for a BxHxWx3 uint8 batch."""
        tensor = to_model_input(images)
        step = self.max_batch
        if step is not None and tensor.shape[0] > step:
            parts = [self.run(tensor[i : i + step]) for i in range(0, tensor.shape[0], step)]
            return np.concatenate(parts, axis=0)
        return self.run(tensor)

    def run(self, tensor: np.ndarray) -> np.ndarray:
        """The session alone on a prepared float NCHW tensor (at most `max_batch`)."""
        out: np.ndarray = self._session.run([self._output], {self._input: tensor})[0]
        return out

    def detect(self, images: np.ndarray, params: Sequence[DetectParams]) -> list[np.ndarray]:
        raw = self.infer(images)
        try:
            return decode_batch(raw, params)
        except ValueError as exc:
            raise InferenceError(str(exc)) from exc


class UltralyticsEngine:
    """A `.pt` model served through Ultralytics, read by `checked_yolo` (never unpickled
    unchecked). Not what `load_engine` serves (it exports `.pt` files to ONNX): kept for
    the GPU batch benchmark's comparison."""

    def __init__(self, path: Path, imgsz: int, device: str | None = None) -> None:
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        try:
            self._model = checked_yolo(path)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"cannot load {path.name}: {exc}") from exc
        self._device = device or ("0" if gpu_present() else "cpu")
        self.names = {int(k): str(v) for k, v in self._model.names.items()}
        self.imgsz = imgsz
        self.providers = [f"ultralytics:{self._device}"]

    def batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return stack_padded(images, None, RECT_STRIDE)

    def detect(self, images: np.ndarray, params: Sequence[DetectParams]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(params)
        groups: dict[DetectParams, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(p, []).append(i)
        for p, idx in groups.items():  # one predict call per distinct parameter set
            results = self._model.predict(
                [images[i] for i in idx],
                imgsz=self.imgsz,
                conf=p.conf,
                iou=p.iou,
                classes=list(p.classes) if p.classes is not None else None,
                max_det=p.max_det,
                device=self._device,
                verbose=False,
                rect=False,
            )
            for i, r in zip(idx, results, strict=True):
                boxes: Any = r.boxes  # type: ignore[union-attr]  # ultralytics.engine.results.Boxes
                out[i] = boxes.data.cpu().numpy().astype(np.float32).reshape(-1, 6)
        return [o if o is not None else np.zeros((0, 6), np.float32) for o in out]


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    imgsz: int = 640
    intra_op_threads: int = 1
    trt_cache_dir: Path | None = None
    fp16: bool = True
    gpu: bool | None = None  # None: any GPU present; replicas pass what Ray assigned them
    onnx_cache_dir: Path | None = None  # `.pt` exports; None: a temporary one per load
    trt_max_batch: int = TRT_MAX_BATCH  # TensorRT's profile ceiling (larger: in parts)

    def __post_init__(self) -> None:
        if self.trt_max_batch < 1:
            raise ValueError("trt_max_batch must be >= 1")


def load_engine(
    path: Path, options: EngineOptions, on_converting: Callable[[], None] | None = None
) -> Engine:
    """Build the engine a model file calls for; reports `converting` while a `.pt` is
    exported to ONNX (not cached yet) and when TensorRT will build an engine that is not
    cached yet (minutes on first start)."""
    if path.suffix == ".pt":
        with pt_as_onnx(path, "detect", options.onnx_cache_dir, options.imgsz, on_converting) as (
            onnx_path,
            names,
        ):
            engine = load_engine(onnx_path, options, on_converting)
        if engine.names != names:
            raise ModelLoadError(f"{path.name}: its ONNX export names other classes than it")
        return engine
    if path.suffix != ".onnx":
        raise ModelLoadError(f"unsupported model format {path.suffix!r} (use .onnx or .pt)")
    import onnxruntime as ort

    available = ort.get_available_providers()
    gpu = gpu_present() if options.gpu is None else options.gpu
    trt_options: dict[str, str] | None = None
    if gpu and TENSORRT in available and options.trt_cache_dir is not None:
        trt_options = tensorrt_options(path, options)
    providers = choose_providers(
        available,
        gpu,
        options.trt_cache_dir if trt_options is not None else None,
        options.fp16,
        trt_options,
    )
    if trt_options is not None and options.trt_cache_dir is not None:
        options.trt_cache_dir.mkdir(parents=True, exist_ok=True)
        prefix = trt_options["trt_engine_cache_prefix"]
        if not trt_engine_cached(options.trt_cache_dir, prefix) and on_converting:
            on_converting()
    return OnnxEngine(
        path,
        options.imgsz,
        options.intra_op_threads,
        providers,
        max_batch=profile_max_batch(trt_options or {}),
    )


def tensorrt_options(path: Path, options: EngineOptions) -> dict[str, str] | None:
    """TensorRT's options for a detector model (its profile, and its engines' cache key),
    or None where TensorRT is left to CUDA: its library did not load, or the batch is
    dynamic and the input's name cannot be written into a profile (TensorRT would then
    rebuild its engine at each larger batch). The input is checked first: a model
    `OnnxEngine` refuses must not cost an engine build."""
    if not preload_gpu_libraries(tensorrt=True):
        return None
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    inputs = model_inputs(path)
    check_image_input(path.name, [dims for _, dims in inputs], options.imgsz)
    name, dims = inputs[0]
    profile = trt_profile_shapes(name, dims, options.imgsz, options.trt_max_batch)
    dynamic = not all(isinstance(d, int) and d > 0 for d in dims)
    if dynamic and not profile:
        logger.warning(
            "%s: input %r cannot be written into a TensorRT profile: CUDA serves it",
            path.name,
            name[:80],
        )
        return None
    build = [*sorted(profile.values()), f"fp16={options.fp16}"]
    return {**profile, "trt_engine_cache_prefix": model_digest(path, *build)}


class ModelState(enum.StrEnum):
    LOADING = "loading"
    CONVERTING = "converting"
    ENABLED = "enabled"
    ERROR = "error"


class Described(Protocol):
    """What a slot reports of any engine it holds."""

    @property
    def providers(self) -> Sequence[Any]: ...

    @property
    def imgsz(self) -> int: ...

    @property
    def names(self) -> dict[int, str]: ...


E = TypeVar("E", bound=Described)


class ModelSlot(Generic[E]):
    """Holds one model's engine and its availability; loads in a background thread."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self._lock = threading.Lock()
        self._state = ModelState.LOADING
        self._error: str | None = None
        self._engine: E | None = None
        self._thread: threading.Thread | None = None
        self._load_s: float | None = None
        self._started_at = time.monotonic()

    def start(self, loader: Callable[[Callable[[], None]], E]) -> None:
        """Run `loader(mark_converting)` in a daemon thread; state follows its outcome."""
        self._started_at = time.monotonic()
        self._thread = threading.Thread(
            target=self._load, args=(loader,), daemon=True, name=f"load-{self.model_id}"
        )
        self._thread.start()

    def join(self, timeout_s: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _set(self, state: ModelState, error: str | None = None, engine: E | None = None) -> None:
        with self._lock:
            self._state, self._error, self._engine = state, error, engine

    async def wait_loaded(self, timeout_s: float) -> None:
        """Wait while the model is plainly loading, until `timeout_s` after the load
        began: a replica that autoscaling just added takes requests before its model is
        in memory, and its first frames should wait a second, not fail; a load that
        hangs fails requests at once after that. A conversion (a `.pt` export, a
        TensorRT build: minutes) is not waited for; `engine()` then says why."""
        deadline = self._started_at + timeout_s
        while self._state is ModelState.LOADING and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # polled: no executor thread held per waiting request

    def _load(self, loader: Callable[[Callable[[], None]], E]) -> None:
        start = time.monotonic()
        try:
            engine = loader(lambda: self._set(ModelState.CONVERTING))
            self._load_s = round(time.monotonic() - start, 3)
        except Exception as exc:
            logger.exception("model %s failed to load", self.model_id)
            self._set(ModelState.ERROR, f"{type(exc).__name__}: {exc}")
            return
        self._set(ModelState.ENABLED, engine=engine)
        logger.info("model %s enabled on %s", self.model_id, engine.providers)

    def status(self) -> dict[str, Any]:
        with self._lock:
            engine = self._engine
            status: dict[str, Any] = {"state": self._state.value, "error": self._error}
        if engine is not None:
            status.update(
                providers=list(engine.providers),
                imgsz=engine.imgsz,
                classes=engine.names,
                load_s=self._load_s,
            )
        return status

    def engine(self) -> E:
        """The engine, or `ModelNotReadyError` carrying the current state."""
        with self._lock:
            if self._engine is None:
                raise ModelNotReadyError(self.model_id, self._state.value, self._error)
            return self._engine
