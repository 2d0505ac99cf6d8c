"""Decides, without running anything, what a PyTorch `.pt` file's pickles would do.

A `.pt` is a zip whose `data.pkl` is a pickle, and a pickle can call anything it can
import: `GLOBAL x y` imports `x.y`, `REDUCE` calls it with arguments from the file.
Importing only "safe" names is not enough: calling an allowed *class* with arbitrary
arguments runs its `__init__` (`ultralytics.nn.autobackend.AutoBackend("https://…")`
downloads and unpickles another file). So both this scan and the load
(`graph.pipeline.ptload`, under the same rules) look at what each global is *used for*:

- a plain-data or tensor-rebuild function (`CALLABLE`: `torch._utils._rebuild_tensor_v2`,
  `collections.OrderedDict`, `torch.Size` …) may be called (`REDUCE`);
- a model class (torch / torchvision / Ultralytics layers, `CLASS_MODULES`) may only be
  created the way `torch.save` writes a module: `NEWOBJ` with no arguments (`cls.__new__`,
  no `__init__`) and then `BUILD` (its `__dict__` / `__setstate__`) — never called;
- `BUILD` may only give a state to an object the pickle created (`NEWOBJ`, or a
  constructor in `BUILDABLE`), and `APPEND(S)`, `SETITEM(S)`, `ADDITEMS` only change a
  list, dict or set — never an imported class, function or shared object;
- protocol 0/1 instantiation (`INST`, `OBJ`) and the copyreg extension registry (`EXT*`),
  which `torch.save` never writes, are refused.

`pt_problems` reads this from the opcodes alone (nothing is imported or executed), and
refuses zips whose member names repeat, ignoring case (torch's reader matches names that
way, Python's zipfile does not: they could read different copies), and TorchScript
archives (`torch.load` hands those to `torch.jit.load`, which runs their code). Legacy
(non-zip) torch files are refused; so are pickles calling `builtins.getattr`, which some
official Ultralytics segment/pose checkpoints do.
"""

from __future__ import annotations

import collections
import contextlib
import io
import pickletools
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}

# Functions (and plain-data types) a checkpoint may call with arguments from the file.
CALLABLE = {
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
    "torch": {"Size", "device"},
    "numpy": {"dtype"},
    "numpy.core.multiarray": {"scalar"},
    "numpy._core.multiarray": {"scalar"},
    "_codecs": {"encode"},
    "types": {"SimpleNamespace"},  # keyword arguments only: positional ones raise
    "ultralytics.utils": {"IterableSimpleNamespace"},
    "torchvision.transforms.functional": {"InterpolationMode"},  # Enum: looks a member up
}
# Calls whose arguments are checked: `(module, name) -> (arity, {position: what})`, what
# being CLASS (an allowed model class) or the one global allowed there. An Enum called
# with more than one argument would build a new Enum; the copyreg and numpy
# reconstructors create an instance of their first argument without `__init__`.
CLASS = "an allowed model class"
CHECKED: dict[tuple[str, str], tuple[int, dict[int, object]]] = {
    ("torchvision.transforms.functional", "InterpolationMode"): (1, {}),
    ("copyreg", "__newobj__"): (1, {0: CLASS}),
    ("copyreg", "_reconstructor"): (3, {0: CLASS, 1: ("builtins", "object")}),
    ("numpy.core.multiarray", "_reconstruct"): (3, {0: ("numpy", "ndarray")}),
    ("numpy._core.multiarray", "_reconstruct"): (3, {0: ("numpy", "ndarray")}),
    ("numpy", "dtype"): (3, {}),  # (spec, align, copy): the load also wants copy=True
}
# Calls whose result is a new object that BUILD may then give a state (the others may
# return shared objects: an Enum member, a cached dtype …).
BUILDABLE = {
    ("copyreg", "__newobj__"),
    ("copyreg", "_reconstructor"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("types", "SimpleNamespace"),
    ("ultralytics.utils", "IterableSimpleNamespace"),
}
# Classes that may be created (NEWOBJ, no arguments) and given a state (BUILD).
CLASSES = {"argparse": {"Namespace"}}
# Modules whose classes (capitalised names defined there) are model layers/transforms.
CLASS_MODULES = (
    "torch.nn.modules.",
    "torchvision.transforms.transforms",
    "ultralytics.nn.modules.",
    "ultralytics.nn.tasks",
    "ultralytics.utils.loss",
    "ultralytics.utils.tal",
)
# Referenced as values only (dtypes, storage types in tensor ids), never called.
VALUES = {
    "torch": {
        "dtype",
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
    },
    "numpy": {"ndarray"},  # `_reconstruct`'s first argument
    "builtins": {"object"},  # `copyreg._reconstructor`'s base
}

NOT_ALLOWED = "which is not allowed in a model file (loading it could run code)"
CALLS_ONLY = "a model file may only call tensor and container rebuild functions"


def canonical_module(module: str) -> str:
    """The module a pickle's module name imports (Python 2 names read as their successors)."""
    return ALIASES.get(module, module)


def is_class(module: str, name: str) -> bool:
    """May be created without `__init__` (NEWOBJ) and given a state (BUILD)."""
    module = canonical_module(module)
    if name in CLASSES.get(module, ()):
        return True
    in_layers = any(
        module == prefix or (prefix.endswith(".") and module.startswith(prefix))
        for prefix in CLASS_MODULES
    )
    return in_layers and name[:1].isupper() and "." not in name


def is_callable(module: str, name: str) -> bool:
    """May be called with arguments from the file (REDUCE)."""
    module = canonical_module(module)
    return name in CALLABLE.get(module, ()) or (module, name) in CHECKED


def allowed(module: str, name: str) -> bool:
    """May be imported at all (as a value, a class or a rebuild function)."""
    module = canonical_module(module)
    if not (name.isidentifier() and all(part.isidentifier() for part in module.split("."))):
        return False  # GLOBAL's two lines read back as "module name": no room for spaces
    if module == "torch" and name.endswith("Storage") and name[:1].isupper():
        return True
    return name in VALUES.get(module, ()) or is_callable(module, name) or is_class(module, name)


# --- the static scan --------------------------------------------------------------------


class Global(NamedTuple):
    module: str
    name: str

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


class Made(NamedTuple):
    """Something the pickle created: "list", "dict", "set", "new" (NEWOBJ), "obj"
    (REDUCE), …"""

    kind: str
    by: Global | None = None


_STRINGS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "SHORT_BINSTRING",
    "BINSTRING",
    "STRING",
}
_REFUSED_OPS = {"INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID"}
_DICT_MAKERS = {Global("collections", "OrderedDict"), Global("builtins", "dict")}


class _Malformed(Exception):
    pass


def _describe(value: object) -> str:
    if isinstance(value, Global):
        return f"the imported {value}"
    if isinstance(value, Made):
        kind = "an object" if value.kind in ("obj", "new") else f"a {value.kind}"
        return kind + (f" made by {value.by}" if value.by else "")
    return "a value the scan cannot name"


class _Scan:
    """Replays a pickle's stack with descriptions instead of objects."""

    def __init__(self) -> None:
        self.stack: list[object] = []
        self.metastack: list[list[object]] = []
        self.memo: dict[int, object] = {}
        self.problems: dict[str, None] = {}  # ordered, without repeats
        self.found: list[tuple[str, str]] = []  # every (module, name) imported

    def refuse(self, text: str) -> None:
        self.problems.setdefault(text, None)

    def pop(self) -> object:
        if not self.stack:
            raise _Malformed("stack underflow")
        return self.stack.pop()

    def pop_mark(self) -> list[object]:
        if not self.metastack:
            raise _Malformed("no MARK")
        items, self.stack = self.stack, self.metastack.pop()
        return items

    def push(self, value: object) -> None:
        self.stack.append(value)

    def top(self) -> object:
        if not self.stack:
            raise _Malformed("stack underflow")
        return self.stack[-1]

    def imported(self, module: str, name: str) -> Global:
        self.found.append((module, name))
        ref = Global(canonical_module(module), name)
        if not allowed(module, name):
            self.refuse(f"imports {module}.{name}, {NOT_ALLOWED}")
        return ref

    def call(self, func: object, args: object) -> Made:
        if not isinstance(func, Global):
            self.refuse(f"calls {_describe(func)} (pickle REDUCE), {NOT_ALLOWED}")
            return Made("obj")
        if not is_callable(*func):
            self.refuse(f"calls {func} with arguments from the file (pickle REDUCE); {CALLS_ONLY}")
        elif func in CHECKED:
            arity, expected = CHECKED[func]
            if not isinstance(args, tuple) or len(args) != arity:
                self.refuse(f"calls {func} with unexpected arguments (pickle REDUCE)")
                return Made("obj", func)
            for i, what in expected.items():
                arg = args[i]
                if what is CLASS:
                    ok = isinstance(arg, Global) and is_class(*arg)
                else:
                    ok = isinstance(arg, Global) and arg == what
                if not ok:
                    wanted = what if what is CLASS else ".".join(what)  # type: ignore[arg-type]
                    self.refuse(f"calls {func} with {_describe(arg)}, not {wanted}")
        return Made("obj", func)

    def create(self, cls: object, args: object, op: str) -> Made:
        if not (isinstance(cls, Global) and is_class(*cls)):
            self.refuse(f"creates {_describe(cls)} (pickle {op}), which is not a model class")
        elif args != ():
            self.refuse(f"creates {cls} with constructor arguments (pickle {op})")
        return Made("new", cls if isinstance(cls, Global) else None)

    def changes(self, target: object, op: str, kinds: tuple[str, ...]) -> None:
        ok = isinstance(target, Made) and (
            target.kind in kinds or ("dict" in kinds and target.by in _DICT_MAKERS)
        )
        if not ok:
            self.refuse(f"changes {_describe(target)} (pickle {op}), not a {kinds[0]} it created")

    def run(self, data: bytes) -> None:
        for op, arg, _ in pickletools.genops(data):
            self.step(op, arg)

    def step(self, op: pickletools.OpcodeInfo, arg: Any) -> None:
        name, push = op.name, self.push  # not stack.append: MARK ops replace self.stack
        if name in _STRINGS:
            push(str(arg))
        elif name == "MARK":
            self.metastack.append(self.stack)
            self.stack = []
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            self.memo[int(arg)] = self.top()
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self.top()
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if int(arg) not in self.memo:
                raise _Malformed(f"memo {arg} read before it was written")
            push(self.memo[int(arg)])
        elif name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            push(self.imported(module, attr))
        elif name == "STACK_GLOBAL":
            top, below = self.pop(), self.pop()
            if isinstance(below, str) and isinstance(top, str):
                push(self.imported(below, top))
            else:  # built by other means than string pushes: refuse, do not guess
                self.refuse("imports a name built at load time (STACK_GLOBAL), " + NOT_ALLOWED)
                push(None)
        elif name in _REFUSED_OPS:
            self.refuse(f"uses pickle opcode {name}, which torch.save never writes")
            raise _Malformed(f"opcode {name}")  # its stack effect is not replayed
        elif name == "REDUCE":
            args, func = self.pop(), self.pop()
            push(self.call(func, args))
        elif name == "NEWOBJ":
            args, cls = self.pop(), self.pop()
            push(self.create(cls, args, name))
        elif name == "NEWOBJ_EX":
            kwargs, args, cls = self.pop(), self.pop(), self.pop()
            made = self.create(cls, args, name)
            if not (isinstance(kwargs, Made) and kwargs.kind == "dict" and kwargs.by is None):
                self.refuse(f"creates {_describe(cls)} with keyword arguments (pickle {name})")
            push(made)
        elif name == "BUILD":
            self.pop()  # the state
            target = self.top()
            fresh = isinstance(target, Made) and (
                target.kind == "new" or (target.kind == "obj" and target.by in BUILDABLE)
            )
            if not fresh:
                self.refuse(f"sets the state of {_describe(target)} (pickle BUILD)")
        elif name == "EMPTY_TUPLE":
            push(())
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = tuple(self.pop() for _ in range(n))[::-1]
            push(items)
        elif name == "TUPLE":
            push(tuple(self.pop_mark()))
        elif name in ("EMPTY_LIST", "LIST"):
            if name == "LIST":
                self.pop_mark()
            push(Made("list"))
        elif name in ("EMPTY_DICT", "DICT"):
            if name == "DICT":
                self.pop_mark()
            push(Made("dict"))
        elif name == "EMPTY_SET":
            push(Made("set"))
        elif name == "FROZENSET":
            self.pop_mark()
            push(Made("frozenset"))
        elif name == "APPEND":
            self.pop()
            self.changes(self.top(), name, ("list",))
        elif name == "SETITEM":
            self.pop(), self.pop()
            self.changes(self.top(), name, ("dict",))
        elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
            self.pop_mark()
            kinds = {"APPENDS": ("list",), "SETITEMS": ("dict",), "ADDITEMS": ("set",)}[name]
            self.changes(self.top(), name, kinds)
        elif name == "BINPERSID":
            self.pop()
            push(Made("storage"))
        elif name == "POP":
            if self.stack:
                self.stack.pop()
            else:
                self.pop_mark()
        elif name == "POP_MARK":
            self.pop_mark()
        elif name == "DUP":
            push(self.top())
        elif name in ("PROTO", "FRAME", "STOP"):
            pass
        else:  # constants (ints, floats, bytes, None, booleans) and buffers
            if pickletools.markobject in op.stack_before:
                raise _Malformed(f"opcode {name}")
            for _ in op.stack_before:
                self.pop()
            self.stack.extend([None] * len(op.stack_after))


def pickle_problems(data: bytes) -> list[str]:
    """What loading this pickle would do that a model file may not (empty: nothing)."""
    scan = _Scan()
    try:
        scan.run(data)
    except _Malformed as exc:
        if not scan.problems:
            scan.refuse(f"malformed pickle ({exc})")
    except Exception as exc:  # a truncated or malformed pickle
        scan.refuse(f"unreadable pickle: {exc}")
    return list(scan.problems)


def pickle_globals(data: bytes) -> list[tuple[str, str]]:
    """Every (module, name) a pickle imports, read from its opcodes only."""
    scan = _Scan()
    with contextlib.suppress(_Malformed):
        scan.run(data)
    return scan.found


def _zip_problems(archive: zipfile.ZipFile, label: str) -> list[str]:
    names = [info.filename for info in archive.infolist()]
    seen = collections.Counter(n.lower() for n in names)
    problems = [
        f"{label}: holds {n!r} {seen[n.lower()]} times (which copy is loaded depends on the reader)"
        for n in sorted({n for n in names if seen[n.lower()] > 1})
    ]
    data_pkls = [n for n in names if n.lower().rsplit("/", 1)[-1] == "data.pkl"]
    if len(data_pkls) > 1:
        problems.append(f"{label}: holds more than one data.pkl ({', '.join(sorted(data_pkls))})")
    if any(n.lower().rsplit("/", 1)[-1] == "constants.pkl" for n in names):
        problems.append(f"{label}: a TorchScript archive (loading it runs its code)")
    return problems


def pt_bytes_problems(data: bytes, label: str) -> list[str]:
    """Why these `.pt` bytes may not be loaded (empty: a plain checkpoint)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except Exception:  # BadZipFile, or a header that makes it fail otherwise
        return [f"{label}: not a zip-format torch file (legacy pickles are not accepted)"]
    with archive:
        problems = _zip_problems(archive, label)
        pickles = [i for i in archive.infolist() if i.filename.lower().endswith(".pkl")]
        if not pickles:
            problems.append(f"{label}: no pickle inside (not a torch checkpoint)")
        for info in pickles:
            try:
                found = pickle_problems(archive.read(info))
            except Exception as exc:  # a corrupt member
                found = [f"unreadable: {exc}"]
            where = f"{label}: {info.filename}" if len(pickles) > 1 else label
            problems += [f"{where}: {p}" for p in found]
    return problems


def pt_problems(path: Path, label: str | None = None) -> list[str]:
    """Why a .pt file may not be loaded (empty: only allowed globals, used as allowed)."""
    return pt_bytes_problems(path.read_bytes(), label or path.name)
