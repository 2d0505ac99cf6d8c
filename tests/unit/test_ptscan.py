"""`.pt` files are checked from their pickle opcodes before anything unpickles them."""

from __future__ import annotations

import builtins
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from deployments.inference.engines import EngineOptions, load_engine
from graph.common.errors import ModelLoadError
from graph.config import PROJECT_ROOT
from graph.pipeline.archive import ArchiveError, ArchiveLimits, load_archive
from graph.pipeline.ptscan import allowed, is_callable, is_class, pickle_globals, pt_problems
from tests.unit.test_archive import DEMO, good_members, write_zip


class RunsAShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch {self.marker}",))


class Evaluates:
    def __reduce__(self) -> tuple[object, ...]:
        return (builtins.eval, ("__import__('os').getpid()",))


class CallsSubprocess:
    def __reduce__(self) -> tuple[object, ...]:
        return (subprocess.check_call, (["true"],))


def test_ultralytics_checkpoints_pass() -> None:
    """The committed demo checkpoints (detector, classifier) are real Ultralytics files."""
    for name in ("demo-detector.pt", "body-type.pt"):
        assert pt_problems(PROJECT_ROOT / "models" / name) == []


@pytest.mark.parametrize(
    "payload, expected", [(Evaluates(), "eval"), (CallsSubprocess(), "check_call")]
)
def test_pickles_that_would_run_code_are_refused(
    tmp_path: Path, payload: object, expected: str
) -> None:
    torch.save({"model": payload}, tmp_path / "evil.pt")
    problems = pt_problems(tmp_path / "evil.pt")
    assert problems and expected in problems[0]


def test_refusing_never_unpickles(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"model": RunsAShell(marker)}, tmp_path / "evil.pt")
    assert "system" in pt_problems(tmp_path / "evil.pt")[0]
    with pytest.raises(ModelLoadError, match="not allowed"):
        load_engine(tmp_path / "evil.pt", EngineOptions(640))
    assert not marker.exists()


def test_legacy_and_non_torch_files_are_refused(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    assert "legacy" in pt_problems(legacy)[0]
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert pt_problems(tmp_path / "junk.pt")


def test_the_allowlist_takes_classes_not_functions() -> None:
    assert allowed("ultralytics.nn.modules.conv", "Conv")
    assert not allowed("ultralytics.nn.tasks", "torch_safe_load")
    assert not allowed("ultralytics.utils.checks", "check_requirements")
    assert allowed("__builtin__", "set") and not allowed("builtins", "getattr")
    # Not a layer (it loads other files): never in a checkpoint, not even as a class.
    assert not allowed("ultralytics.nn.autobackend", "AutoBackend")
    # Classes are created (NEWOBJ + BUILD), never called; rebuild functions are called.
    assert is_class("ultralytics.nn.tasks", "DetectionModel")
    assert not is_callable("ultralytics.nn.tasks", "DetectionModel")
    assert is_callable("torch._utils", "_rebuild_tensor_v2")
    assert not is_class("torch._utils", "_rebuild_tensor_v2")
    assert pickle_globals(b"\x80\x04\x8c\x02os\x8c\x06system\x93.") == [("os", "system")]


def test_an_archive_carrying_a_malicious_pt_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"model": RunsAShell(marker)}, tmp_path / "evil.pt")
    pipeline = json.loads(json.dumps(DEMO))
    pipeline["pipeline"]["modelFile"] = "evil.pt"
    members = {**good_members(pipeline), "evil.pt": (tmp_path / "evil.pt").read_bytes()}
    archive = write_zip(tmp_path / "evil.mpta", members)
    with pytest.raises(ArchiveError, match=r"evil\.pt: imports posix\.system"):
        load_archive(archive, tmp_path / "cache", ArchiveLimits())
    assert list((tmp_path / "cache").iterdir()) == [] and not marker.exists()
