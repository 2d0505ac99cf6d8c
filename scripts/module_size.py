"""Fails when a hand-written Python module is over the line limit (generated gRPC stubs
and the virtual environment are skipped). `make lint` runs it."""

from __future__ import annotations

import sys
from pathlib import Path

LIMIT = 600
ROOT = Path(__file__).resolve().parent.parent
SKIPPED_PARTS = {".venv", "build", "node_modules", ".git"}


def oversized(root: Path = ROOT, limit: int = LIMIT) -> list[tuple[str, int]]:
    """(path, lines) of every hand-written module over `limit` lines, sorted by path."""
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SKIPPED_PARTS & set(relative.parts) or "_pb2" in path.name:
            continue
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > limit:
            found.append((str(relative), lines))
    return found


def main() -> int:
    found = oversized()
    for path, lines in found:
        print(f"{path}: {lines} lines (limit {LIMIT}): split it by concept")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
