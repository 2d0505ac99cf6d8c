"""Loads a `.pt` file that `graph.pipeline.ptscan` passed, enforcing the same rules.

`safe_torch_load` reads the file once, scans those bytes (`pt_bytes_problems`), then
enforces the scan's rules *while* unpickling the very same bytes, through a restricted
`pickle_module` for `torch.load`; `module_problems` then refuses a model whose hooks or
attributes hold something to call.

Why not `torch.load(weights_only=True)`: Ultralytics checkpoints pickle whole `nn.Module`
objects, so it needs every layer class added as a safe global, and torch's restricted
unpickler then lets `REDUCE` call any of those classes with any arguments — the attack
`graph.pipeline.ptscan` describes. (Ultralytics' own `ULTRALYTICS_SAFE_LOAD` works the
same way and is absent in 8.3.)
"""

from __future__ import annotations

import collections
import importlib
import io
import pickle
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from graph.common.errors import ModelLoadError
from graph.pipeline.ptscan import (
    BUILDABLE,
    CALLS_ONLY,
    CHECKED,
    CLASS,
    CLASSES,
    NOT_ALLOWED,
    Global,
    allowed,
    canonical_module,
    is_callable,
    is_class,
    pt_bytes_problems,
)


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
        ref = Global(canonical_module(module), name)
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
