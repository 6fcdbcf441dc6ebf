"""What a load gives: ``DeviceTensor`` and ``LoadResult``, and the outputs they hold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .. import quant
from ..device import Backend
from ..errors import DeviceMemoryError
from ..model import TensorInfo
from ..profiler import Profile
from .plan import LoadOptions, out_kind

@dataclass
class DeviceTensor:
    """A loaded tensor: ``array`` (CuPy on a GPU, NumPy on the host backend) and its ``info``.
    ``dtype`` is the logical dtype ("float16", "bfloat16", ... or "raw" for quantized bytes);
    bfloat16 arrays hold uint16 bit patterns."""

    info: TensorInfo
    array: Any
    dtype: str
    mode: str

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def to_torch(self):
        """Zero-copy ``torch.Tensor`` through DLPack (bfloat16 bit patterns as torch.bfloat16)."""
        import torch

        t = torch.from_dlpack(self.array)
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t

    def numpy(self) -> np.ndarray:
        a = self.array
        if not isinstance(a, np.ndarray):
            import cupy

            a = cupy.asnumpy(a)
        if self.dtype == "bfloat16":
            a = a.view(quant.resolve_dtype("bfloat16"))
        return a


@dataclass
class LoadResult(Mapping[str, DeviceTensor]):
    """What ``load`` returns: a read-only mapping of tensor name to ``DeviceTensor`` (``r[name]``,
    ``len(r)``, ``for name in r``), with ``file_bytes`` moved, ``out_bytes`` on the device,
    ``wall_s`` (from the backend being ready to the last byte in place), ``gb_s``, the
    ``options`` used, the ``backend`` name, the ``profile`` (spans; None with ``profile=False``) and
    the ``path`` of the file. ``to_torch()`` gives every tensor as a ``torch.Tensor`` without copies
    (needs torch)."""

    tensors: dict[str, DeviceTensor]
    file_bytes: int
    out_bytes: int
    wall_s: float
    options: LoadOptions
    backend: str
    profile: Profile | None = None
    path: str | None = None

    def __getitem__(self, k):
        return self.tensors[k]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)

    @property
    def gb_s(self) -> float:
        """File bytes moved per second of wall time."""
        return self.file_bytes / self.wall_s / 1e9 if self.wall_s else float("inf")

    def to_torch(self) -> dict:
        return {k: v.to_torch() for k, v in self.tensors.items()}

    def __repr__(self):
        return (f"<LoadResult {len(self.tensors)} tensors, {self.file_bytes / 1e9:.3f} GB in {self.wall_s:.3f} s "
                f"({self.gb_s:.1f} GB/s), mode={self.options.mode}, backend={self.backend}>")


def alloc_outputs(backend: Backend, tensors: Sequence[TensorInfo], mode: str, dtype: str) -> dict[str, DeviceTensor]:
    out: dict[str, DeviceTensor] = {}
    for t in tensors:
        logical, store = out_kind(t, mode, dtype)
        n = t.n_bytes if mode == "raw" else t.n_elements
        out[t.name] = DeviceTensor(t, backend.empty(n, store), logical, mode)
    return out


def finish_shapes(result: dict[str, DeviceTensor]) -> None:
    """Outputs were filled flat; give the dequantized ones their tensor shapes (raw stays bytes)."""
    for dt in result.values():
        if dt.dtype != "raw":
            dt.array = dt.array.reshape(dt.info.np_shape)


def check_memory(backend: Backend, path: str, tensors: Sequence[TensorInfo], mode: str, dtype: str, extra: int) -> None:
    """Fail before allocating anything when the outputs (and ``extra`` bytes) cannot fit."""
    need = extra + sum((t.n_bytes if mode == "raw" else t.n_elements * out_kind(t, mode, dtype)[1].itemsize)
                       for t in tensors)
    free = backend.mem_free()
    if free is not None and need > free:
        raise DeviceMemoryError(f"{path}: loading {len(tensors)} tensors ({mode}, {dtype}) needs {need} bytes of "
                                f"device memory; {free} bytes are free")
