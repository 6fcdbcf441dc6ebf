"""gguf-gpu-lab: load GGUF models onto a GPU fast, and see how it was done.

The ways in::

    import gguf_gpu_lab as lab
    m = lab.open_model("model.gguf")          # header only: metadata, tensor table, m[name]
    r = lab.load("model.gguf")                # every tensor on the GPU (host backend without one)
    r.profile                                 # what the loader did, span by span
    lab.plots.timeline(r.profile)             # ... as a picture

``lab.plots``, ``lab.widgets`` (notebooks), ``lab.hf`` (transformers models:
``lab.hf.from_gguf``), ``lab.tools`` (``synth``, ``verify``, the fuzzer, the demo and the
benchmarks), ``lab.loader`` and ``lab.quant`` are imported on first use, so
``import gguf_gpu_lab`` stays light.
"""

from __future__ import annotations

import importlib as _importlib

from .errors import (
    BackendError,
    DeviceMemoryError,
    GGUFFormatError,
    GGUFLabError,
    LoadCancelled,
    MetadataNotFoundError,
    ModelNotFoundError,
    OutputExistsError,
    RemoteError,
    RemoteNotFoundError,
    RemoteWarning,
    TensorNotFoundError,
    SourceChangedError,
    UnsupportedTypeError,
)
from .loader import DeviceTensor, LoadResult, Shard, ShardError, load
from . import cache as _cache  # noqa: F401,E402  (registers the lazy device cache with GGUFModel)
from . import warmup as _warmup  # noqa: F401,E402  (registers the warm-up started when a model is opened)
from .model import GGUFModel, TensorInfo, open_model
from .quant import dequantize, type_spec
from .scan import Problem

__version__ = "0.1.0"

_LAZY_MODULES = ("plots", "widgets", "hf", "tools", "profiler", "device")


def check(model, *, max_problems: int = 100) -> list[Problem]:
    """NaN/Inf in float tensors and in quantized block scales, by tensor and block, of an open
    model or a path (``[]`` when every value is finite).

    Example:
        >>> check("model.gguf")
        []
    """
    if isinstance(model, GGUFModel):
        return model.check(max_problems=max_problems)
    with open_model(model, warmup=False) as m:
        return m.check(max_problems=max_problems)


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():  # what tab completion offers: the public face and the submodules meant for users
    return sorted({*__all__, *_LAZY_MODULES, "loader", "model", "quant", "errors"})


__all__ = [
    "open_model", "load", "check", "GGUFModel", "TensorInfo", "LoadResult", "DeviceTensor", "Problem",
    "dequantize", "type_spec", "GGUFLabError", "GGUFFormatError", "ModelNotFoundError", "TensorNotFoundError",
    "MetadataNotFoundError", "OutputExistsError", "SourceChangedError", "RemoteError", "RemoteNotFoundError",
    "RemoteWarning", "UnsupportedTypeError", "DeviceMemoryError", "LoadCancelled", "BackendError", "Shard",
    "ShardError", "__version__",
]
