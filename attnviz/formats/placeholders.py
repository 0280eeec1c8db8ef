"""Inert stand-ins for the globals a pickle names: they record, they never run.

Subclasses are made per global by ``foreign_class``; instances come from REDUCE (a call),
NEWOBJ (``__new__``) and BUILD (``__setstate__``). ``names_code`` is True for every global
outside a small allowlist of data types that are inert under a normal unpickler: a denylist of
dangerous globals always lags (``cProfile.run``, ``uuid._get_command_stdout`` ...), so anything
not known to be inert gets a DANGER line.
"""

from __future__ import annotations

import re
import struct
from typing import Any

# Globals that build plain data when a normal unpickler (torch.load(weights_only=False)) calls
# them: nothing else happens. Exact (module, name) pairs; dotted names ('A.method') never match.
INERT_GLOBALS = frozenset(
    {("argparse", "Namespace"), ("typing", "Any"), ("copyreg", "_reconstructor"),
     ("copyreg", "__newobj__")}
    | {("collections", n) for n in ("OrderedDict", "defaultdict", "Counter", "deque")}
    | {("builtins", n) for n in ("set", "frozenset", "bytearray", "complex", "slice", "dict",
                                 "list", "tuple", "int", "float", "str", "bytes", "bool",
                                 "object", "NoneType")}
    | {("datetime", n) for n in ("datetime", "date", "time", "timedelta", "timezone")}
    | {("decimal", "Decimal"), ("fractions", "Fraction"), ("uuid", "UUID")}
    | {("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath",
                                "PureWindowsPath")}
    | {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
       for n in ("scalar", "_reconstruct")}
    | {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")}
    | {("numpy", "dtype"), ("numpy", "ndarray")}
    | {("omegaconf.dictconfig", "DictConfig"), ("omegaconf.listconfig", "ListConfig"),
       ("omegaconf.base", "ContainerMetadata"), ("omegaconf.base", "Metadata")}
    | {("omegaconf.nodes", n) for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode",
                                        "BooleanNode", "BytesNode", "PathNode")}
    | {("torch", n) for n in ("device", "Size", "Tensor", "strided", "sparse_coo")}
    | {("torch.nn.parameter", n) for n in ("Parameter", "Buffer")}
    | {("torch.serialization", "_get_layout")}
    | {("torch._utils", n) for n in (
        "_rebuild_qtensor", "_rebuild_sparse_tensor", "_rebuild_meta_tensor_no_storage",
        "_rebuild_device_tensor_from_numpy", "_rebuild_device_tensor_from_cpu_tensor",
        "_rebuild_nested_tensor", "_rebuild_wrapper_subclass", "_rebuild_tensor_v3")}
    # activations that torch.save(model) pickles by reference (TransformerEncoderLayer's relu)
    | {("torch.nn.functional", n) for n in (
        "relu", "gelu", "silu", "tanh", "sigmoid", "softmax", "log_softmax", "elu", "leaky_relu",
        "mish", "hardswish", "hardsigmoid", "relu6", "selu", "celu", "softplus", "glu")}
)
# torch.save(model): torch's own layer classes, by the module that defines them (as pickled).
# tests/test_hostile_pickles.py checks each is an nn.Module subclass in the installed torch.
TORCH_LAYERS: dict[str, str] = {
    "activation": "CELU ELU GELU GLU Hardshrink Hardsigmoid Hardswish Hardtanh LeakyReLU "
    "LogSigmoid LogSoftmax Mish MultiheadAttention PReLU RReLU ReLU ReLU6 SELU SiLU Sigmoid "
    "Softmax Softmax2d Softmin Softplus Softshrink Softsign Tanh Tanhshrink Threshold",
    "adaptive": "AdaptiveLogSoftmaxWithLoss",
    "batchnorm": "BatchNorm1d BatchNorm2d BatchNorm3d LazyBatchNorm1d LazyBatchNorm2d "
    "LazyBatchNorm3d SyncBatchNorm",
    "channelshuffle": "ChannelShuffle",
    "container": "Container ModuleDict ModuleList ParameterDict ParameterList Sequential",
    "conv": "Conv1d Conv2d Conv3d ConvTranspose1d ConvTranspose2d ConvTranspose3d LazyConv1d "
    "LazyConv2d LazyConv3d LazyConvTranspose1d LazyConvTranspose2d LazyConvTranspose3d",
    "distance": "CosineSimilarity PairwiseDistance",
    "dropout": "AlphaDropout Dropout Dropout1d Dropout2d Dropout3d FeatureAlphaDropout",
    "flatten": "Flatten Unflatten",
    "fold": "Fold Unfold",
    "instancenorm": "InstanceNorm1d InstanceNorm2d InstanceNorm3d LazyInstanceNorm1d "
    "LazyInstanceNorm2d LazyInstanceNorm3d",
    "linear": "Bilinear Identity LazyLinear Linear NonDynamicallyQuantizableLinear",
    "loss": "BCELoss BCEWithLogitsLoss CTCLoss CosineEmbeddingLoss CrossEntropyLoss "
    "GaussianNLLLoss HingeEmbeddingLoss HuberLoss KLDivLoss L1Loss MSELoss MarginRankingLoss "
    "MultiLabelMarginLoss MultiLabelSoftMarginLoss MultiMarginLoss NLLLoss NLLLoss2d "
    "PoissonNLLLoss SmoothL1Loss SoftMarginLoss TripletMarginLoss TripletMarginWithDistanceLoss",
    "module": "Module",
    "normalization": "CrossMapLRN2d GroupNorm LayerNorm LocalResponseNorm RMSNorm",
    "padding": "CircularPad1d CircularPad2d CircularPad3d ConstantPad1d ConstantPad2d "
    "ConstantPad3d ReflectionPad1d ReflectionPad2d ReflectionPad3d ReplicationPad1d "
    "ReplicationPad2d ReplicationPad3d ZeroPad1d ZeroPad2d ZeroPad3d",
    "pixelshuffle": "PixelShuffle PixelUnshuffle",
    "pooling": "AdaptiveAvgPool1d AdaptiveAvgPool2d AdaptiveAvgPool3d AdaptiveMaxPool1d "
    "AdaptiveMaxPool2d AdaptiveMaxPool3d AvgPool1d AvgPool2d AvgPool3d FractionalMaxPool2d "
    "FractionalMaxPool3d LPPool1d LPPool2d LPPool3d MaxPool1d MaxPool2d MaxPool3d MaxUnpool1d "
    "MaxUnpool2d MaxUnpool3d",
    "rnn": "GRU GRUCell LSTM LSTMCell RNN RNNBase RNNCell RNNCellBase",
    "sparse": "Embedding EmbeddingBag",
    "transformer": "Transformer TransformerDecoder TransformerDecoderLayer TransformerEncoder "
    "TransformerEncoderLayer",
    "upsampling": "Upsample UpsamplingBilinear2d UpsamplingNearest2d",
}
_TORCH_LAYER_GLOBALS = frozenset((f"torch.nn.modules.{module}", name)
                                 for module, names in TORCH_LAYERS.items()
                                 for name in names.split())
_NUMPY_DTYPE_CLASS = re.compile(r"[A-Z][A-Za-z0-9]*DType", re.ASCII)
# Globals that unpickle bytes they are given: their payload is read with the restricted reader.
NESTED_LOADERS = frozenset({("torch.storage", "_load_from_bytes"), ("pickle", "loads"),
                            ("_pickle", "loads"), ("pickle", "_loads")})


def is_inert(module: str, name: str) -> bool:
    """True for the allowlisted data types; everything else may run code when unpickled."""
    if (module, name) in INERT_GLOBALS or (module, name) in _TORCH_LAYER_GLOBALS:
        return True
    return module == "numpy.dtypes" and bool(_NUMPY_DTYPE_CLASS.fullmatch(name))


def names_code(module: str, name: str) -> bool:
    """True when a global is not known to be inert: a normal unpickler could run code with it."""
    return not is_inert(module, name)


class ForeignObject:
    """Inert record of a global the pickle asked for: module, name, arguments, state.

    Subclasses are made per global by ``foreign_class``; instances come from REDUCE (call),
    NEWOBJ (``__new__``) and BUILD (``__setstate__``). Nothing here runs code from the file.
    Slots keep an instance near 64 bytes: a pickle may make millions of them.
    """

    __slots__ = ("_items", "_kwargs", "args", "state")
    foreign_module: str = ""
    foreign_name: str = ""
    names_code: bool = False
    args: tuple[Any, ...]
    state: Any
    _kwargs: dict[str, Any] | None
    _items: list[Any] | None

    def __new__(cls, *args: Any, **kwargs: Any) -> ForeignObject:
        instance = super().__new__(cls)
        instance.args = args
        instance._kwargs = kwargs or None
        instance.state = None
        instance._items = None
        return instance

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Arguments were recorded by ``__new__``; nothing else happens."""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def kwargs(self) -> dict[str, Any]:
        return self._kwargs or {}

    @property
    def items(self) -> list[Any]:
        return self._items or []

    # pickle's APPEND(S) and SETITEM(S) on a non-list / non-dict object call these.
    def append(self, item: Any) -> None:
        if self._items is None:
            self._items = []
        self._items.append(item)

    def extend(self, items: Any) -> None:
        for item in items:
            self.append(item)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.append((key, value))

    def __call__(self, *args: Any, **kwargs: Any) -> ForeignObject:
        """A placeholder used as a callable (``getattr(os, 'system')('ls')``) records the call."""
        return ForeignCall(self, *args, **kwargs)

    @classmethod
    def qualified_name(cls) -> str:
        return f"{cls.foreign_module}.{cls.foreign_name}"

    def attribute(self, name: str) -> Any:
        """Read a recorded attribute (``args.nheads``) from state or keyword arguments."""
        state = self.state
        if isinstance(state, dict) and name in state:
            return state[name]
        if isinstance(state, tuple) and state and isinstance(state[-1], dict) and name in state[-1]:
            return state[-1][name]
        return self.kwargs.get(name)

    def __repr__(self) -> str:
        return f"<foreign {type(self).qualified_name()[:200]}>"


class NestedPickle(ForeignObject):
    """``torch.storage._load_from_bytes(b)`` and ``pickle.loads(b)``: a pickle inside the pickle.

    A normal unpickler loads ``b`` with ``torch.load(weights_only=False)``; attnviz reads it with
    the same restricted reader (attnviz.formats.nested) to list what it names.
    """

    __slots__ = ()

    @property
    def payload(self) -> bytes | None:
        data = self.args[0] if self.args else None
        return bytes(data) if isinstance(data, bytes | bytearray) else None


def foreign_class(module: str, name: str, dangerous: bool | None = None) -> type[ForeignObject]:
    flagged = names_code(module, name) if dangerous is None else dangerous
    attrs = {"__slots__": (), "foreign_module": module, "foreign_name": name,
             "names_code": flagged}
    base = NestedPickle if (module, name) in NESTED_LOADERS else ForeignObject
    return type("Foreign", (base,), attrs)  # the name is data: never copied into the type


class ForeignCall(ForeignObject):
    """A call made on a placeholder: ``args[0]`` is the callee, the rest its arguments.

    Calling what a call returned is never how data is pickled, so it always counts as code.
    """

    __slots__ = ()
    foreign_module = "<call>"
    foreign_name = "<call>"
    names_code = True

    @property
    def callee(self) -> ForeignObject:
        callee: ForeignObject = self.args[0]
        return callee

    def describe_call(self) -> str:
        from attnviz.text_safety import safe_repr

        callee = self.callee
        return f"{type(callee).qualified_name()}(...)(" + ", ".join(
            safe_repr(a) for a in self.args[1:5]) + ")"

    @property
    def calls_code(self) -> bool:
        return True


class NumpyScalar(ForeignObject):
    """``numpy.core.multiarray.scalar(dtype, bytes)``: decoded with struct, never with numpy."""

    __slots__ = ()
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
        fmt = formats.get(code) if isinstance(code, str) else None
        raw = bytes(self.args[1])
        if fmt is None or struct.calcsize(fmt) != len(raw):
            return None
        return struct.unpack("<" + fmt, raw)[0]
