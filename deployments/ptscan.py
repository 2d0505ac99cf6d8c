"""Static check of PyTorch `.pt` files before anything unpickles them.

A `.pt` is a pickle: loading it can call any importable function (`os.system` …).
Ultralytics checkpoints pickle whole modules, so `torch.load(weights_only=True)` refuses
them. Instead every global the pickle would import is read from its opcodes (nothing is
executed) and checked against an allowlist of what model checkpoints need: tensor
rebuilding, containers, and *classes* of torch / torchvision / ultralytics modules
(names starting with a capital letter — their functions, such as downloaders or
requirement installers, are not allowed). Anything else rejects the file.
"""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path

_STRING_OPS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "SHORT_BINSTRING",
    "BINSTRING",
    "STRING",
}
_MEMO_PUT = {"BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"}
_MEMO_GET = {"BINGET", "LONG_BINGET", "GET"}

EXACT = {
    "builtins": {
        "set",
        "frozenset",
        "dict",
        "list",
        "tuple",
        "slice",
        "range",
        "bool",
        "int",
        "float",
        "complex",
        "bytes",
        "bytearray",
        "str",
    },
    "collections": {"OrderedDict", "deque"},
    "torch._utils": {
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
        "_rebuild_qtensor",
    },
    "torch": {
        "Size",
        "device",
        "dtype",
        "float32",
        "float16",
        "bfloat16",
        "int64",
        "int32",
        "uint8",
        "bool",
    },
    "numpy": {"dtype", "ndarray"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "_codecs": {"encode"},
    "argparse": {"Namespace"},
    "types": {"SimpleNamespace"},
    "ultralytics.utils": {"IterableSimpleNamespace"},
}
# Modules whose classes (capitalised names) may be rebuilt: model layers and transforms.
CLASS_PREFIXES = ("torch.nn.modules.", "torchvision.transforms.", "ultralytics.nn.")
ALIASES = {"__builtin__": "builtins"}


def pickle_globals(data: bytes) -> list[tuple[str, str]]:
    """Every (module, name) a pickle imports, read from its opcodes only."""
    found: list[tuple[str, str]] = []
    stack: list[object] = []  # the recent pushes: enough to resolve STACK_GLOBAL
    memo: dict[int, object] = {}
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in _STRING_OPS:
            stack.append(arg)
        elif name in _MEMO_PUT:
            index = len(memo) if name == "MEMOIZE" else int(arg)  # type: ignore[arg-type]
            memo[index] = stack[-1] if stack else None
        elif name in _MEMO_GET:
            stack.append(memo.get(int(arg)))  # type: ignore[arg-type]
        elif name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found.append((module, attr))
            stack.append(None)
        elif name == "STACK_GLOBAL":
            top: tuple[object, object] = (stack[-2], stack[-1]) if len(stack) >= 2 else (0, 0)
            if isinstance(top[0], str) and isinstance(top[1], str):
                found.append((top[0], top[1]))
            else:  # built by other means than string pushes: refuse, do not guess
                found.append(("<unresolved>", "STACK_GLOBAL"))
            stack.append(None)
        else:
            stack.append(None)
        del stack[:-64]
    return found


def allowed(module: str, name: str) -> bool:
    module = ALIASES.get(module, module)
    if name in EXACT.get(module, set()):
        return True
    if module == "torch" and name.endswith("Storage"):
        return True
    return module.startswith(CLASS_PREFIXES) and name[:1].isupper() and "." not in name


def pt_problems(path: Path, label: str | None = None) -> list[str]:
    """Why a .pt file may not be loaded (empty: only allowed globals)."""
    label = label or path.name
    if not zipfile.is_zipfile(path):
        return [f"{label}: not a zip-format torch file (legacy pickles are not accepted)"]
    problems = []
    with zipfile.ZipFile(path) as z:
        pickles = [n for n in z.namelist() if n.endswith(".pkl")]
        if not pickles:
            return [f"{label}: no pickle inside (not a torch checkpoint)"]
        for member in pickles:
            try:
                refs = pickle_globals(z.read(member))
            except Exception as exc:  # a truncated or malformed pickle
                problems.append(f"{label}: unreadable pickle {member}: {exc}")
                continue
            for module, name in sorted(set(refs)):
                if not allowed(module, name):
                    problems.append(
                        f"{label}: imports {module}.{name}, which is not allowed in a model "
                        "file (loading it could run code)"
                    )
    return problems
