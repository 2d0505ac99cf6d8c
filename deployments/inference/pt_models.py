"""Ultralytics `.pt` checkpoints (no Ray): `checked_yolo`, the one way camgraph reads
one, and `export_onnx`, which turns a checked checkpoint into an ONNX file once and keeps
it in a cache keyed by the checkpoint's sha256, so that `.pt` models are served by the
same ONNX Runtime code (CUDA, TensorRT) as `.onnx` ones.

Cache layout, for a checkpoint whose bytes hash to SHA: `SHA.onnx` (exported at the
checkpoint's own `imgsz`: branch classifiers) or `SHA-IMGSZ.onnx` (at a configured size:
detectors), each with a `.json` record (`ExportRecord`) written after it. A record that
is missing, unreadable or does not match the request is a miss. Writes go to a temporary
file in the cache directory renamed over the final name, the record last, so a replica
never reads half a file; an exclusive lock per key keeps two replicas from exporting the
same model twice (where the file system has no locks, both export and the last rename
wins: the files are equivalent)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from graph.common.errors import ModelLoadError
from graph.common.files import atomic_write_bytes
from graph.common.schemas import StrictModel

logger = logging.getLogger(__name__)

Task = Literal["detect", "classify"]
USES = {"detect": "a detector", "classify": "a branch classifier"}


def checked_yolo(path: Path) -> Any:
    """`ultralytics.YOLO(path)`, except for how the checkpoint is read.

    Ultralytics reads a `.pt` with `torch.load(weights_only=False)` (and may download or
    pip-install what a file names). Its checkpoints pickle whole `nn.Module` objects, so
    `weights_only=True` would need every layer class as a safe global, and torch would then
    let the pickle *call* those classes with its own arguments. Instead `safe_torch_load`
    reads the file once, scans those bytes and unpickles the same bytes through a restricted
    unpickler (`graph.pipeline.ptload`); the model is then prepared as Ultralytics'
    `nn.tasks.load_checkpoint` does. Raises ModelLoadError (UnsafeModelError: refused)."""
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import guess_model_task
    from ultralytics.utils import DEFAULT_CFG_DICT

    from graph.pipeline.ptload import UnsafeModelError, module_problems, safe_torch_load

    class CheckedYOLO(YOLO):  # type: ignore[misc]
        def _load(self, weights: str, task: str | None = None) -> None:
            ckpt = safe_torch_load(path)
            module = None
            if isinstance(ckpt, dict):
                module = ckpt.get("ema") if ckpt.get("ema") is not None else ckpt.get("model")
            if not isinstance(module, torch.nn.Module):
                raise ModelLoadError(f"{path.name} is not an Ultralytics checkpoint (no model)")
            if ckpt.get("modelopt"):
                raise ModelLoadError(f"{path.name}: quantization-aware checkpoints are not served")
            if problems := module_problems(module, path.name):
                raise UnsafeModelError(problems)
            model: Any = module.float()
            model.args = {**DEFAULT_CFG_DICT, **ckpt.get("train_args", {})}
            model.pt_path = str(path)
            model.task = getattr(model, "task", guess_model_task(model))
            if not hasattr(model, "stride"):
                model.stride = torch.tensor([32.0])
            model = model.eval()
            for m in model.modules():
                if hasattr(m, "inplace"):
                    m.inplace = True
                elif isinstance(m, torch.nn.Upsample) and not hasattr(m, "recompute_scale_factor"):
                    m.recompute_scale_factor = None
            self.model, self.ckpt = model, ckpt
            self.task = model.task
            self.overrides = model.args = self._reset_ckpt_args(model.args)
            self.ckpt_path = model.pt_path
            self.overrides["model"] = weights
            self.overrides["task"] = self.task
            self.model_name = weights

    return CheckedYOLO(str(path), task="detect")


class ExportRecord(StrictModel):
    """The `.json` next to a cached export: what it was made from and for."""

    source_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="the .pt's bytes")
    task: Task
    imgsz: int = Field(ge=32, le=4096, description="the ONNX input's fixed height and width")
    names: dict[int, str] = Field(description="class names, as in the ONNX metadata")


@dataclass(frozen=True)
class OnnxExport:
    """An exported model: the ONNX file and its record; `cached` when nothing was run."""

    path: Path
    record: ExportRecord
    cached: bool


def cache_key(sha256: str, imgsz: int | None) -> str:
    return sha256 if imgsz is None else f"{sha256}-{imgsz}"


def export_onnx(
    pt: Path,
    task: Task,
    cache_dir: Path,
    imgsz: int | None = None,
    on_converting: Callable[[], None] | None = None,
) -> OnnxExport:
    """The ONNX export of checkpoint `pt` for `task` at `imgsz` (None: the checkpoint's
    own training size, as Ultralytics' predict uses), from `cache_dir` or made there.

    A miss calls `on_converting`, reads the checkpoint only through `checked_yolo` (the
    pickle checks) and writes to the cache only once it passed them and its task fits.
    A hit still passes the byte scan (no unpickling), so a rule added later applies to
    cached models too. Raises ModelLoadError (UnsafeModelError: refused)."""
    from graph.pipeline.ptload import UnsafeModelError
    from graph.pipeline.ptscan import pt_bytes_problems

    try:
        data = pt.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"model file not found or unreadable: {pt} ({exc})") from exc
    if problems := pt_bytes_problems(data, pt.name):
        raise UnsafeModelError(problems)  # never unpickled, nothing written
    sha256 = hashlib.sha256(data).hexdigest()
    key = cache_key(sha256, imgsz)
    if hit := _cached(cache_dir, key, sha256, task, pt.name):
        return hit
    if on_converting is not None:
        on_converting()
    with tempfile.TemporaryDirectory(prefix="camgraph-export-") as work:
        # Load the very bytes that were hashed and scanned (not the file again), under
        # the file's own name: the checks' messages name it.
        copy = Path(work) / pt.name
        copy.write_bytes(data)
        yolo = _load(copy, task)
        size = imgsz if imgsz is not None else _checkpoint_imgsz(yolo, pt.name)
        names = {int(k): str(v) for k, v in yolo.names.items()}
        record = ExportRecord(source_sha256=sha256, task=task, imgsz=size, names=names)
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive(cache_dir / f"{key}.lock"):
            if hit := _cached(cache_dir, key, sha256, task, pt.name):
                return hit  # another replica exported it while this one waited
            onnx_bytes = _export(yolo, copy, size, pt.name)
            atomic_write_bytes(cache_dir / f"{key}.onnx", onnx_bytes)
            atomic_write_bytes(cache_dir / f"{key}.json", record.model_dump_json().encode())
    logger.info("exported %s (%s, %d px) to %s.onnx", pt.name, task, size, key)
    return OnnxExport(cache_dir / f"{key}.onnx", record, cached=False)


def _cached(cache_dir: Path, key: str, sha256: str, task: Task, label: str) -> OnnxExport | None:
    path = cache_dir / f"{key}.onnx"
    try:
        record = ExportRecord.model_validate_json((cache_dir / f"{key}.json").read_bytes())
    except (OSError, ValidationError):
        return None
    if record.source_sha256 != sha256 or not path.is_file():
        return None
    if record.task != task:  # recorded after its load: no need to load it again
        raise _wrong_task(label, record.task, task)
    return OnnxExport(path, record, cached=True)


def _wrong_task(label: str, found: str, task: Task) -> ModelLoadError:
    return ModelLoadError(
        f"{label} is a {found} model; {USES[task]} needs a {task} model (Ultralytics task)"
    )


def _load(copy: Path, task: Task) -> Any:
    try:
        yolo = checked_yolo(copy)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load {copy.name}: {exc}") from exc
    if yolo.task != task:
        raise _wrong_task(copy.name, str(yolo.task), task)
    return yolo


def _checkpoint_imgsz(yolo: Any, label: str) -> int:
    """The size the checkpoint was trained at, else Ultralytics' default, rounded up to
    the model's stride: what Ultralytics' predict uses for it."""
    from ultralytics.utils import DEFAULT_CFG_DICT
    from ultralytics.utils.checks import check_imgsz

    size = yolo.overrides.get("imgsz") or DEFAULT_CFG_DICT["imgsz"]
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise ModelLoadError(f"{label}: trained at {size}, not a square size")
        size = size[0]
    size = int(check_imgsz(int(size), stride=int(yolo.model.stride.max())))
    if not 32 <= size <= 4096:
        raise ModelLoadError(f"{label}: trained at {size} px, outside 32-4096")
    return size


def _export(yolo: Any, copy: Path, imgsz: int, label: str) -> bytes:
    """Ultralytics' ONNX export on the CPU: dynamic batch (replicas batch requests), the
    height and width then fixed to `imgsz` (one TensorRT profile, and OnnxEngine checks
    them); its metadata keeps `names`. Raw head output: camgraph runs NMS itself."""
    import importlib.util

    import onnx

    try:
        yolo.model.pt_path = str(copy)  # Ultralytics writes the .onnx next to this path
        out = yolo.export(
            format="onnx",
            imgsz=imgsz,
            dynamic=True,
            simplify=importlib.util.find_spec("onnxslim") is not None,  # else it pip-installs
            device="cpu",
            verbose=False,
        )
        model = onnx.load(str(out))
        (images,) = model.graph.input
        for axis in (2, 3):
            images.type.tensor_type.shape.dim[axis].dim_value = imgsz
        onnx.checker.check_model(model)
    except Exception as exc:  # torch.onnx / onnx raise many types
        raise ModelLoadError(f"{label}: export to ONNX failed: {exc}") from exc
    return bytes(model.SerializeToString())


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive lock while exporting (released if the process dies); without lock
    support on the file system, none: concurrent exports then only repeat work."""
    with open(lock_path, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as exc:
            logger.warning("no lock on %s (%s): exporting without one", lock_path, exc)
        yield


@contextlib.contextmanager
def pt_as_onnx(
    path: Path,
    task: Task,
    cache_dir: Path | None,
    imgsz: int | None = None,
    on_converting: Callable[[], None] | None = None,
) -> Iterator[tuple[Path, dict[int, str]]]:
    """The ONNX export of a `.pt` (`pt_models.export_onnx`) and its class names, for as
    long as a session is made from it; without a cache directory, a temporary one."""
    with contextlib.ExitStack() as stack:
        if cache_dir is None:
            cache_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        exported = export_onnx(path, task, cache_dir, imgsz, on_converting)
        yield exported.path, exported.record.names
