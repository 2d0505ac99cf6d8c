"""Hostile `.pt` files whose pickles only import allowed names, but use them to run code:
refused by the scan, by the load itself, by `camgraph mpta validate` and by the engine
the `/detect` model loads; real Ultralytics checkpoints still pass and load.

New names (`UnsafeModelError`, `safe_torch_load` …) are imported inside the tests that
need them, so that each test fails on its own against the code before the fix."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from deployments.inference.engines import EngineOptions, load_engine
from graph.common.errors import ModelLoadError
from graph.config import PROJECT_ROOT
from graph.pipeline.ptscan import pt_problems
from tests.unit.test_archive import DEMO, good_members, write_zip

URL = "https://example.invalid/x.pt"


def text(value: str) -> bytes:
    data = value.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def glob(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


# The issue's five opcodes: GLOBAL AutoBackend, a string, TUPLE1, REDUCE (and STOP).
AUTOBACKEND = glob("ultralytics.nn.autobackend", "AutoBackend") + text(URL)
AUTOBACKEND += pickle.TUPLE1 + pickle.REDUCE + pickle.STOP
# The same with a class the allowlist does import: a model class, called with arguments.
LAYER_CALL = glob("ultralytics.nn.tasks", "DetectionModel") + text("x.yaml")
LAYER_CALL += pickle.TUPLE1 + pickle.REDUCE + pickle.STOP
# Protocol 4: STACK_GLOBAL from memoized strings, the class fetched back from the memo.
MEMO_CALL = (
    pickle.PROTO
    + b"\x04"
    + pickle.SHORT_BINUNICODE
    + b"\x14ultralytics.nn.tasks"
    + pickle.MEMOIZE
    + pickle.SHORT_BINUNICODE
    + b"\x0eDetectionModel"
    + pickle.MEMOIZE
    + pickle.STACK_GLOBAL
    + pickle.MEMOIZE
    + pickle.POP
    + pickle.BINGET
    + b"\x02"
    + text("x.yaml")
    + pickle.TUPLE1
    + pickle.REDUCE
    + pickle.STOP
)
# A class may be created (NEWOBJ), never with constructor arguments.
NEWOBJ_ARGS = glob("ultralytics.nn.tasks", "DetectionModel") + text("x.yaml")
NEWOBJ_ARGS += pickle.TUPLE1 + pickle.NEWOBJ + pickle.STOP
# BUILD on an imported class sets class attributes (state: {"stride": 1}).
BUILD_CLASS = glob("ultralytics.nn.tasks", "DetectionModel") + pickle.EMPTY_DICT
BUILD_CLASS += text("stride") + pickle.BININT1 + b"\x01" + pickle.SETITEM
BUILD_CLASS += pickle.BUILD + pickle.STOP
# SETITEM into an imported class.
SETITEM_CLASS = glob("collections", "OrderedDict") + text("k") + text("v")
SETITEM_CLASS += pickle.SETITEM + pickle.STOP


def torch_zip(path: Path, *pickles: bytes | tuple[str, bytes]) -> Path:
    """A real torch.save zip (byteorder, version …) whose `archive/data.pkl` is replaced
    by `pickles`, in order (more than one: the same member name repeated, unless a
    `(name, data)` pair names another)."""
    buf = io.BytesIO()
    torch.save({}, buf)
    with (
        zipfile.ZipFile(buf) as src,
        zipfile.ZipFile(path, "w") as out,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")  # "Duplicate name": the point of some tests
        for info in src.infolist():
            if info.filename.endswith("/data.pkl"):
                for item in pickles:
                    name, data = item if isinstance(item, tuple) else (info.filename, item)
                    out.writestr(name, data)
            else:
                out.writestr(info.filename, src.read(info))
    return path


@pytest.fixture
def markers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Constructing AutoBackend or DetectionModel (the payloads' targets) writes a file."""
    from ultralytics.nn.autobackend import AutoBackend
    from ultralytics.nn.tasks import DetectionModel

    marker = tmp_path / "payload-ran"

    def ran(self: object, *args: object, **kwargs: object) -> None:
        marker.write_text(repr(args))

    monkeypatch.setattr(AutoBackend, "__init__", ran)
    monkeypatch.setattr(DetectionModel, "__init__", ran)
    yield marker
    assert not marker.exists(), "the payload ran"


HOSTILE = {
    "autobackend": ((AUTOBACKEND,), r"AutoBackend with arguments from the file \(pickle REDUCE\)"),
    "layer-call": ((LAYER_CALL,), r"DetectionModel with arguments from the file \(pickle REDUCE\)"),
    "memo-call": ((MEMO_CALL,), r"DetectionModel with arguments from the file \(pickle REDUCE\)"),
    "newobj-args": ((NEWOBJ_ARGS,), r"DetectionModel with constructor arguments"),
    "build-class": ((BUILD_CLASS,), r"sets the state of the imported .*DetectionModel"),
    "setitem-class": ((SETITEM_CLASS,), r"changes the imported collections.OrderedDict"),
    # Two archive/data.pkl: the hostile one first, a harmless one last (what zipfile reads).
    "duplicate": ((AUTOBACKEND, pickle.dumps({}, protocol=2)), r"'archive/data.pkl' 2 times"),
    # torch's reader matches names ignoring case and takes the last: DATA.PKL is loaded.
    "case-duplicate": (
        (pickle.dumps({}, protocol=2), ("archive/DATA.PKL", AUTOBACKEND)),
        r"'archive/DATA.PKL' 2 times",
    ),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_the_scan_refuses_calls_and_changes_that_imports_alone_allow(
    tmp_path: Path, case: str
) -> None:
    pickles, reason = HOSTILE[case]
    problems = pt_problems(torch_zip(tmp_path / f"{case}.pt", *pickles))
    assert problems and any(re.search(reason, p) for p in problems), problems


def test_the_issue_example_names_autobackend_and_reduce(tmp_path: Path) -> None:
    problems = pt_problems(torch_zip(tmp_path / "x.pt", AUTOBACKEND))
    assert problems[0].startswith("x.pt: imports ultralytics.nn.autobackend.AutoBackend")
    assert "calls ultralytics.nn.autobackend.AutoBackend with arguments" in problems[1]
    duplicate = pt_problems(torch_zip(tmp_path / "d.pt", AUTOBACKEND, pickle.dumps({})))
    assert any("more than one data.pkl" in p for p in duplicate)


@pytest.mark.parametrize("case", HOSTILE)
def test_the_engine_refuses_each_file_without_running_it(
    tmp_path: Path, markers: Path, case: str
) -> None:
    """`load_engine` is what the /detect model's slot calls for a `.pt` modelFile."""
    pickles, reason = HOSTILE[case]
    path = torch_zip(tmp_path / f"{case}.pt", *pickles)
    with pytest.raises(ModelLoadError, match=reason) as info:
        load_engine(path, EngineOptions(64, gpu=False))
    from graph.pipeline.ptload import UnsafeModelError

    assert isinstance(info.value, UnsafeModelError) and info.value.problems


@pytest.mark.parametrize("case", [c for c in HOSTILE if "duplicate" not in c])
def test_the_load_itself_enforces_the_rules_without_the_scan(
    tmp_path: Path, markers: Path, case: str
) -> None:
    """torch.load through the restricted pickle module: refused while unpickling."""
    from graph.pipeline.ptload import UnsafePickleError, restricted_pickle

    path = torch_zip(tmp_path / f"{case}.pt", *HOSTILE[case][0])
    with pytest.raises(UnsafePickleError):
        torch.load(path, weights_only=False, pickle_module=restricted_pickle)


def test_the_restricted_load_refuses_what_it_does_not_import(tmp_path: Path) -> None:
    from graph.pipeline.ptload import UnsafePickleError, restricted_pickle

    path = torch_zip(tmp_path / "x.pt", glob("os", "system") + text("true") + b"\x85R.")
    with pytest.raises(UnsafePickleError, match=r"imports os\.system"):
        torch.load(path, weights_only=False, pickle_module=restricted_pickle)


@pytest.mark.parametrize("case", ["autobackend", "layer-call", "duplicate", "case-duplicate"])
def test_camgraph_mpta_validate_refuses_an_archive_carrying_it(tmp_path: Path, case: str) -> None:
    pickles, reason = HOSTILE[case]
    pt = torch_zip(tmp_path / "model.pt", *pickles)
    pipeline = json.loads(json.dumps(DEMO))
    pipeline["pipeline"]["modelFile"] = "model.pt"
    archive = write_zip(
        tmp_path / "x.mpta", {**good_members(pipeline), "model.pt": pt.read_bytes()}
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}  # the tree under test
    done = subprocess.run(
        [str(Path(sys.executable).parent / "camgraph"), "mpta", "validate", str(archive)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 1, done
    assert f"invalid archive {archive}" in done.stderr
    assert re.search(r"  - model\.pt: .*" + reason, done.stderr), done.stderr


def test_torchscript_archives_are_refused(tmp_path: Path) -> None:
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "ts.pt"))
    assert any("TorchScript" in p for p in pt_problems(tmp_path / "ts.pt"))


@pytest.mark.parametrize("name", ["demo-detector.pt", "body-type.pt"])
def test_committed_checkpoints_load_as_torch_loads_them(name: str) -> None:
    from graph.pipeline.ptload import safe_torch_load

    path = PROJECT_ROOT / "models" / name
    checked = safe_torch_load(path)
    plain = torch.load(path, map_location="cpu", weights_only=False)  # trusted: in the repo
    assert type(checked["model"]) is type(plain["model"])
    want = plain["model"].state_dict()
    got = checked["model"].state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert checked["train_args"] == plain["train_args"]


@pytest.fixture(scope="module")
def fresh() -> Any:
    from ultralytics import YOLO

    return YOLO("yolo11n.yaml")  # random weights, offline


def test_a_freshly_built_ultralytics_checkpoint_passes_and_serves(
    tmp_path: Path, fresh: Any
) -> None:
    fresh.save(tmp_path / "fresh.pt")
    assert pt_problems(tmp_path / "fresh.pt") == []
    engine = load_engine(tmp_path / "fresh.pt", EngineOptions(64, gpu=False))
    assert len(engine.names) == 80 and engine.providers == ["CPUExecutionProvider"]  # exported
    from graph.common.vision import DetectParams

    image = torch.zeros(64, 64, 3, dtype=torch.uint8).numpy()
    assert engine.detect(image[None], [DetectParams()])[0].shape[1] == 6


def test_plain_data_a_checkpoint_may_carry_passes_the_scan_and_the_load(tmp_path: Path) -> None:
    import argparse
    import collections

    import numpy as np
    import torchvision.transforms as T
    from torchvision.transforms.functional import InterpolationMode
    from ultralytics.utils import IterableSimpleNamespace

    from graph.pipeline.ptload import safe_torch_load

    data = {
        "model": torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.SiLU()),
        "transforms": T.Compose([T.Resize(8), T.ToTensor()]),
        "array": np.arange(3, dtype=np.float32),
        "scalar": np.float64(1.5),
        "args": argparse.Namespace(a=1),
        "cfg": IterableSimpleNamespace(a=1),
        "mode": InterpolationMode.BILINEAR,
        "dtype": torch.float16,
        "device": torch.device("cpu"),
        "sets": ({1}, frozenset({2})),
        "size": torch.Size([1, 2]),
        "ordered": collections.OrderedDict(a=1),
        "bytes": b"\x00\xff",
        "param": torch.nn.Parameter(torch.ones(2)),
    }
    torch.save(data, tmp_path / "data.pt")
    assert pt_problems(tmp_path / "data.pt") == []
    loaded = safe_torch_load(tmp_path / "data.pt")
    assert {k: type(v) for k, v in loaded.items()} == {k: type(v) for k, v in data.items()}
    assert loaded["mode"] is InterpolationMode.BILINEAR and loaded["cfg"].a == 1
    assert torch.equal(loaded["param"], data["param"]) and loaded["sets"] == data["sets"]


@pytest.mark.parametrize("where", ["forward", "hook"])
def test_a_model_holding_a_class_to_call_is_refused_at_load(
    tmp_path: Path, fresh: Any, markers: Path, where: str
) -> None:
    """Imported as a value (allowed), the class would be called by the first forward: as
    an instance `forward` (it replaces the method) or as a forward pre-hook."""
    import copy

    from ultralytics.nn.tasks import DetectionModel

    model = copy.deepcopy(fresh.model)
    if where == "forward":
        vars(model.model[0])["forward"] = DetectionModel
    else:
        model.model[0].register_forward_pre_hook(DetectionModel)
    torch.save({"model": model}, tmp_path / "x.pt")
    assert pt_problems(tmp_path / "x.pt") == []  # every opcode is one a model uses
    expected = "holds DetectionModel" if where == "forward" else "_forward_pre_hooks is not empty"
    with pytest.raises(ModelLoadError, match=expected):
        load_engine(tmp_path / "x.pt", EngineOptions(64, gpu=False))
