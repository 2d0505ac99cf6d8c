"""Checks and loads PyTorch `.pt` files without letting their pickles run code.

A `.pt` is a zip whose `data.pkl` is a pickle, and a pickle can call anything it can
import: `GLOBAL x y` imports `x.y`, `REDUCE` calls it with arguments from the file.
Importing only "safe" names is not enough: calling an allowed *class* with arbitrary
arguments runs its `__init__` (`ultralytics.nn.autobackend.AutoBackend("https://…")`
downloads and unpickles another file). So both the scan and the load look at what each
global is *used for*:

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
archives (`torch.load` hands those to `torch.jit.load`, which runs their code).
`safe_torch_load` enforces the same rules *while* unpickling, through a restricted
`pickle_module` for `torch.load`, on the very bytes it scanned; `module_problems` then
refuses a model whose hooks or attributes hold something to call.

Why not `torch.load(weights_only=True)`: Ultralytics checkpoints pickle whole `nn.Module`
objects, so it needs every layer class added as a safe global, and torch's restricted
unpickler then lets `REDUCE` call any of those classes with any arguments — the attack
above. (Ultralytics' own `ULTRALYTICS_SAFE_LOAD` works the same way and is absent in 8.3.)
Legacy (non-zip) torch files are refused; so are pickles calling `builtins.getattr`,
which some official Ultralytics segment/pose checkpoints do.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import io
import pickle
import pickletools
import sys
import types
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from graph.common.errors import ModelLoadError

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


def _module(module: str) -> str:
    return ALIASES.get(module, module)


def is_class(module: str, name: str) -> bool:
    """May be created without `__init__` (NEWOBJ) and given a state (BUILD)."""
    module = _module(module)
    if name in CLASSES.get(module, ()):
        return True
    in_layers = any(
        module == prefix or (prefix.endswith(".") and module.startswith(prefix))
        for prefix in CLASS_MODULES
    )
    return in_layers and name[:1].isupper() and "." not in name


def is_callable(module: str, name: str) -> bool:
    """May be called with arguments from the file (REDUCE)."""
    module = _module(module)
    return name in CALLABLE.get(module, ()) or (module, name) in CHECKED


def allowed(module: str, name: str) -> bool:
    """May be imported at all (as a value, a class or a rebuild function)."""
    module = _module(module)
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
        ref = Global(_module(module), name)
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


# --- the load ---------------------------------------------------------------------------


class UnsafeModelError(ModelLoadError):
    """A `.pt` file was refused before or while unpickling it; `problems` says why."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems)
        self.problems = problems

    def __str__(self) -> str:
        return "; ".join(self.problems)


class UnsafePickleError(pickle.UnpicklingError):
    pass


# The pure-Python unpickler: its opcodes can be hooked (the C one only lets find_class be).
_PyUnpickler: Any = pickle._Unpickler


class RestrictedUnpickler(_PyUnpickler):
    """Enforces the scan's rules while unpickling; `torch.load` subclasses it."""

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(_PyUnpickler.dispatch)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._imported: dict[int, tuple[Global, object]] = {}  # id -> (name, object)
        self._callables: set[int] = set()
        self._classes: set[int] = set()
        self._fresh: dict[int, object] = {}  # what BUILD may change: objects made here

    def find_class(self, module: str, name: str) -> Any:
        ref = Global(_module(module), name)
        if not allowed(*ref):
            raise UnsafePickleError(f"imports {module}.{name}, {NOT_ALLOWED}")
        importlib.import_module(ref.module)
        obj = getattr(sys.modules[ref.module], name)
        if is_class(*ref):
            listed = name in CLASSES.get(ref.module, ())  # else: a layer class defined there
            if not isinstance(obj, type) or not (listed or obj.__module__ == ref.module):
                raise UnsafePickleError(f"imports {ref}, which is not a class defined there")
            self._classes.add(id(obj))
        if is_callable(*ref):
            self._callables.add(id(obj))
        self._imported[id(obj)] = (ref, obj)  # keeps obj alive: its id stays its own
        return obj

    def _name(self, obj: object) -> str:
        entry = self._imported.get(id(obj))
        return str(entry[0]) if entry else f"a {type(obj).__name__} object"

    def _is(self, obj: object, ref: object) -> bool:
        entry = self._imported.get(id(obj))
        return entry is not None and entry[0] == ref

    def _check_class(self, cls: object, op: str) -> None:
        if id(cls) not in self._classes or not isinstance(cls, type):
            raise UnsafePickleError(f"creates {self._name(cls)} (pickle {op}), not a model class")
        if cls.__new__ is not object.__new__:
            raise UnsafePickleError(f"creates {self._name(cls)} (pickle {op}): it has a __new__")

    def load_reduce(self) -> None:
        func, args = self.stack[-2], self.stack[-1]
        if id(func) not in self._callables:
            raise UnsafePickleError(
                f"calls {self._name(func)} with arguments from the file (pickle REDUCE); "
                + CALLS_ONLY
            )
        ref = self._imported[id(func)][0]
        if ref in CHECKED:
            arity, expected = CHECKED[ref]
            if not isinstance(args, tuple) or len(args) != arity:
                raise UnsafePickleError(f"calls {ref} with unexpected arguments (pickle REDUCE)")
            for i, what in expected.items():
                if what is CLASS:
                    self._check_class(args[i], f"REDUCE {ref}")
                elif not self._is(args[i], what):
                    raise UnsafePickleError(f"calls {ref} with {self._name(args[i])}")
            if ref == ("numpy", "dtype") and args[2] is not True:
                raise UnsafePickleError(f"calls {ref} for a shared dtype (copy=False)")
        _PyUnpickler.load_reduce(self)
        if ref in BUILDABLE:
            self._fresh[id(self.stack[-1])] = self.stack[-1]

    def load_newobj(self) -> None:
        if type(self.stack[-1]) is not tuple or self.stack[-1]:
            raise UnsafePickleError("creates an object with constructor arguments (NEWOBJ)")
        self._check_class(self.stack[-2], "NEWOBJ")
        _PyUnpickler.load_newobj(self)
        self._fresh[id(self.stack[-1])] = self.stack[-1]

    def load_newobj_ex(self) -> None:
        kwargs, args = self.stack[-1], self.stack[-2]
        if type(kwargs) is not dict or kwargs or type(args) is not tuple or args:
            raise UnsafePickleError("creates an object with constructor arguments (NEWOBJ_EX)")
        self._check_class(self.stack[-3], "NEWOBJ_EX")
        _PyUnpickler.load_newobj_ex(self)
        self._fresh[id(self.stack[-1])] = self.stack[-1]

    def load_build(self) -> None:
        target, state = self.stack[-2], self.stack[-1]
        if self._fresh.get(id(target)) is not target:
            raise UnsafePickleError(f"sets the state of {self._name(target)} (pickle BUILD)")
        if getattr(target, "__setstate__", None) is None and not isinstance(state, dict):
            raise UnsafePickleError("sets attributes through a slot state (pickle BUILD)")
        _PyUnpickler.load_build(self)

    def _changes(self, target: object, op: str, kinds: tuple[type, ...]) -> None:
        if type(target) not in kinds:
            raise UnsafePickleError(f"changes {self._name(target)} (pickle {op})")

    def load_append(self) -> None:
        self._changes(self.stack[-2], "APPEND", (list,))
        _PyUnpickler.load_append(self)

    def load_appends(self) -> None:
        self._changes(self.metastack[-1][-1], "APPENDS", (list,))
        _PyUnpickler.load_appends(self)

    def load_setitem(self) -> None:
        self._changes(self.stack[-3], "SETITEM", (dict, collections.OrderedDict))
        _PyUnpickler.load_setitem(self)

    def load_setitems(self) -> None:
        self._changes(self.metastack[-1][-1], "SETITEMS", (dict, collections.OrderedDict))
        _PyUnpickler.load_setitems(self)

    def load_additems(self) -> None:
        self._changes(self.metastack[-1][-1], "ADDITEMS", (set,))
        _PyUnpickler.load_additems(self)


def _refused(opcode: str) -> Callable[[Any], None]:
    def refuse(_self: Any) -> None:
        raise UnsafePickleError(f"uses pickle opcode {opcode}, which torch.save never writes")

    return refuse


for _op, _method in (
    (pickle.REDUCE, RestrictedUnpickler.load_reduce),
    (pickle.NEWOBJ, RestrictedUnpickler.load_newobj),
    (pickle.NEWOBJ_EX, RestrictedUnpickler.load_newobj_ex),
    (pickle.BUILD, RestrictedUnpickler.load_build),
    (pickle.APPEND, RestrictedUnpickler.load_append),
    (pickle.APPENDS, RestrictedUnpickler.load_appends),
    (pickle.SETITEM, RestrictedUnpickler.load_setitem),
    (pickle.SETITEMS, RestrictedUnpickler.load_setitems),
    (pickle.ADDITEMS, RestrictedUnpickler.load_additems),
    (pickle.INST, _refused("INST")),
    (pickle.OBJ, _refused("OBJ")),
    (pickle.EXT1, _refused("EXT1")),
    (pickle.EXT2, _refused("EXT2")),
    (pickle.EXT4, _refused("EXT4")),
    (pickle.PERSID, _refused("PERSID")),
):
    RestrictedUnpickler.dispatch[_op[0]] = _method


def _refuse_legacy(*_args: Any, **_kwargs: Any) -> Any:
    raise UnsafePickleError("legacy (non-zip) torch files are not accepted")


# What `torch.load(pickle_module=...)` uses: `Unpickler` for zip files, `load` for legacy.
restricted_pickle = types.ModuleType("camgraph_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
restricted_pickle.load = _refuse_legacy  # type: ignore[attr-defined]


_ROUTINES = (
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.MethodWrapperType,
)


def module_problems(model: Any, label: str) -> list[str]:
    """What in a loaded `nn.Module` tree would call something the file chose when it
    runs: hooks (`_forward_hooks` …, empty in a saved model) and classes or functions
    stored as attributes (a `forward` in the instance `__dict__` replaces the method)."""
    problems = []
    for where, module in model.named_modules():
        for key, value in vars(module).items():
            if key.endswith("hooks") and isinstance(value, dict) and value:
                problems.append(f"{label}: {where or 'model'}.{key} is not empty")
            elif isinstance(value, _ROUTINES):
                name = getattr(value, "__qualname__", type(value).__name__)
                problems.append(f"{label}: {where or 'model'}.{key} holds {name}, to be called")
    return problems


def safe_torch_load(path: Path) -> Any:
    """Read `path` once, scan those bytes, then unpickle the same bytes with the rules
    enforced (on CPU). Raises UnsafeModelError when either refuses the file."""
    import torch

    data = path.read_bytes()
    if problems := pt_bytes_problems(data, path.name):
        raise UnsafeModelError(problems)  # never unpickled
    try:
        return torch.load(
            io.BytesIO(data),
            map_location="cpu",
            weights_only=False,
            pickle_module=restricted_pickle,
        )
    except UnsafePickleError as exc:
        raise UnsafeModelError([f"{path.name}: {exc}"]) from exc
