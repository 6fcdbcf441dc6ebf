"""gguf-gpu-lab: load GGUF models onto a GPU fast, and see how it was done."""

from __future__ import annotations

from .check import Problem
from .errors import (
    BackendError,
    DeviceMemoryError,
    GGUFFormatError,
    GGUFLabError,
    LoadCancelled,
    UnsupportedTypeError,
)
from .model import GGUFModel, TensorInfo, open_model
from .quant import dequantize, type_spec

__version__ = "0.1.0"

__all__ = [
    "open_model", "GGUFModel", "TensorInfo", "Problem", "dequantize", "type_spec",
    "GGUFLabError", "GGUFFormatError", "UnsupportedTypeError", "DeviceMemoryError",
    "LoadCancelled", "BackendError", "__version__",
]
