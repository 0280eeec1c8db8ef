"""Inert stand-ins for the globals a pickle names: they record, they never run.

Subclasses are made per global by ``foreign_class``; instances come from REDUCE (a call),
NEWOBJ (``__new__``) and BUILD (``__setstate__``). ``names_code`` flags globals that could
execute code, touch files or import modules if they were called.
"""

from __future__ import annotations

import struct
from typing import Any

# Modules whose every global names code (process, file system, import machinery, eval).
CODE_MODULES = frozenset(
    {
        "os", "posix", "nt", "subprocess", "sys", "importlib", "pkgutil", "runpy", "shutil",
        "socket", "ctypes", "pty", "code", "codeop", "webbrowser", "pickle", "_pickle", "marshal",
        "types", "io", "_io", "tempfile", "asyncio", "multiprocessing", "signal", "platform",
        "commands", "popen2", "posixpath", "ntpath", "pathlib", "urllib", "http", "ftplib",
        "smtplib", "telnetlib", "threading", "_thread", "inspect", "gc", "dill", "cloudpickle",
        "torch.hub", "torch.jit", "torch.serialization", "numpy.testing", "pydoc", "timeit",
    }
)
# Individually dangerous globals from otherwise harmless modules.
CODE_NAMES = frozenset(
    {
        ("builtins", name)
        for name in (
            "eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr",
            "globals", "locals", "vars", "input", "breakpoint", "apply", "execfile", "__builtins__",
            "memoryview", "type", "object", "super", "classmethod", "staticmethod", "property",
        )
    }
    | {("__builtin__", "eval"), ("__builtin__", "exec"), ("__builtin__", "getattr")}
    | {("operator", name) for name in ("methodcaller", "attrgetter", "itemgetter", "call")}
    | {("functools", "partial"), ("functools", "reduce"), ("copyreg", "_reconstructor_ex")}
    | {("numpy", "load"), ("numpy.lib.npyio", "load"), ("torch", "load"), ("torch", "save")}
)


def names_code(module: str, name: str) -> bool:
    """True when a global could execute code, touch files or import modules if it were called."""
    root = module.split(".")[0]
    return (
        module in CODE_MODULES
        or root in CODE_MODULES
        or (module, name) in CODE_NAMES
        or name in {"eval", "exec", "system", "popen", "__import__", "import_module"}
    )



class ForeignObject:
    """Inert record of a global the pickle asked for: module, name, arguments, state.

    Subclasses are made per global by ``foreign_class``; instances come from REDUCE (call),
    NEWOBJ (``__new__``) and BUILD (``__setstate__``). Nothing here runs code from the file.
    """

    foreign_module: str = ""
    foreign_name: str = ""
    names_code: bool = False
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any
    items: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> ForeignObject:
        instance = super().__new__(cls)
        instance.args = args
        instance.kwargs = kwargs
        instance.state = None
        instance.items = []
        return instance

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Arguments were recorded by ``__new__``; nothing else happens."""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    # pickle's APPEND(S) and SETITEM(S) on a non-list / non-dict object call these.
    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def __call__(self, *args: Any, **kwargs: Any) -> ForeignObject:
        """A placeholder used as a callable (``getattr(os, 'system')('ls')``) records the call."""
        return ForeignCall(self, *args, **kwargs)

    @classmethod
    def qualified_name(cls) -> str:
        return f"{cls.foreign_module}.{cls.foreign_name}"

    def attribute(self, name: str) -> Any:
        """Read a recorded attribute (``args.nheads``) from state or keyword arguments."""
        if isinstance(self.state, dict) and name in self.state:
            return self.state[name]
        state = self.state
        if isinstance(state, tuple) and state and isinstance(state[-1], dict) and name in state[-1]:
            return state[-1][name]
        return self.kwargs.get(name)

    def __repr__(self) -> str:
        return f"<foreign {self.qualified_name()}>"


def foreign_class(module: str, name: str, dangerous: bool | None = None) -> type[ForeignObject]:
    flagged = names_code(module, name) if dangerous is None else dangerous
    attrs = {"foreign_module": module, "foreign_name": name, "names_code": flagged}
    return type(f"Foreign[{module}.{name}]", (ForeignObject,), attrs)


class ForeignCall(ForeignObject):
    """A call made on a placeholder: ``args[0]`` is the callee, the rest its arguments."""

    foreign_module = "<call>"
    foreign_name = "<call>"

    @property
    def callee(self) -> ForeignObject:
        callee: ForeignObject = self.args[0]
        return callee

    def describe_call(self) -> str:
        callee = self.callee
        return f"{type(callee).qualified_name()}(...)(" + ", ".join(
            repr(a) if isinstance(a, str | int | float | bytes) else type(a).__name__
            for a in self.args[1:5]) + ")"

    @property
    def calls_code(self) -> bool:
        node: Any = self
        for _ in range(64):  # a chain of calls ends at a named global
            if not isinstance(node, ForeignCall):
                return bool(getattr(type(node), "names_code", False))
            node = node.callee
        return True


class NumpyScalar(ForeignObject):
    """``numpy.core.multiarray.scalar(dtype, bytes)``: decoded with struct, never with numpy."""

    foreign_module = "numpy.core.multiarray"
    foreign_name = "scalar"

    @property
    def value(self) -> Any:
        if len(self.args) != 2 or not isinstance(self.args[1], bytes | bytearray):
            return None
        dtype = self.args[0]
        code = dtype.args[0] if isinstance(dtype, ForeignObject) and dtype.args else None
        formats = {"f8": "d", "f4": "f", "i8": "q", "i4": "i", "i2": "h", "i1": "b", "u1": "B",
                   "u2": "H", "u4": "I", "u8": "Q", "b1": "?"}
        fmt = formats.get(str(code)) if code is not None else None
        raw = bytes(self.args[1])
        if fmt is None or struct.calcsize(fmt) != len(raw):
            return None
        return struct.unpack("<" + fmt, raw)[0]
