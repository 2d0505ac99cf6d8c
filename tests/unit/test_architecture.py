"""The dependency contract in pyproject.toml covers the whole code base: every module of the
three packages sits in exactly one layer, the no-Ray contract names exactly the two bottom
layers, and no hand-written module is over the size limit. (`make lint` runs lint-imports,
which checks the imports themselves.)"""

from __future__ import annotations

import tomllib
from pathlib import Path

from scripts.module_size import LIMIT, oversized

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("deployments", "graph", "stream_actors")


def contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert sorted(config["root_packages"]) == sorted(PACKAGES)
    return {c["id"]: c for c in config["contracts"]}


def layers() -> list[list[str]]:
    return [
        [m.strip() for m in layer.replace("|", ":").split(":")]
        for layer in contracts()["layers"]["layers"]
    ]


def modules() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            if not name.endswith("__init__") and "_pb2" not in name:
                found.append(name)
    return found


def covers(entry: str, module: str) -> bool:
    return module == entry or module.startswith(entry + ".")


def test_every_module_is_in_exactly_one_layer() -> None:
    entries = [(i, entry) for i, layer in enumerate(layers()) for entry in layer]
    placed = {m: [e for _, e in entries if covers(e, m)] for m in modules()}
    assert {m: e for m, e in placed.items() if len(e) != 1} == {}
    assert len(placed) > 60  # the three packages were found


def test_every_layer_entry_names_a_real_module() -> None:
    names = modules()
    missing = [e for layer in layers() for e in layer if not any(covers(e, m) for m in names)]
    assert missing == []


def test_the_no_ray_contract_is_exactly_the_two_bottom_layers() -> None:
    pure = contracts()["pure"]
    assert pure["type"] == "forbidden" and pure["forbidden_modules"] == ["ray"]
    assert sorted(pure["source_modules"]) == sorted(layers()[-2] + layers()[-1])
    assert layers()[-1] == ["graph.common"]


def test_no_hand_written_module_is_over_the_limit() -> None:
    assert LIMIT == 600
    assert oversized() == []


def test_the_size_check_finds_a_long_module(tmp_path: Path) -> None:
    (tmp_path / "long.py").write_text("x = 1\n" * 601)
    (tmp_path / "short.py").write_text("x = 1\n" * 600)
    (tmp_path / "big_pb2.py").write_text("x = 1\n" * 900)
    assert oversized(tmp_path) == [("long.py", 601)]
