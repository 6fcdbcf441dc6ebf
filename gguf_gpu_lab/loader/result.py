"""What a load gives: ``DeviceTensor`` and ``LoadResult``, and the outputs they hold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .. import quant
from ..device import Backend
from ..errors import DeviceMemoryError, TensorNotFoundError, not_found
from ..model import TensorInfo
from ..profiler import Profile
from .placement import Placement
from .plan import LoadOptions, out_kind, output_bytes
from .shard import Cut, Shard

@dataclass
class DeviceTensor:
    """A loaded tensor: ``array`` (CuPy on a GPU, NumPy on the host backend) and its ``info``.
    ``dtype`` is the logical dtype ("float16", "bfloat16", ... or "raw" for quantized bytes);
    bfloat16 arrays hold uint16 bit patterns. ``device``: the index of the device it is on."""

    info: TensorInfo
    array: Any
    dtype: str
    mode: str
    device: int = 0  # the device index the array lives on
    cut: Cut | None = None  # the shard loaded (None: the whole tensor)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def shard(self) -> Shard | None:
        """The ``Shard`` this array holds, or None for the whole tensor."""
        return None if self.cut is None else self.cut.shard

    @property
    def global_shape(self) -> tuple[int, ...]:
        """The whole tensor's NumPy shape (the array's own shape when it is whole)."""
        return self.info.np_shape

    @property
    def region(self) -> tuple[slice, ...]:
        """Where the array sits in the whole tensor (NumPy order): ``whole[region] == array``."""
        return tuple(slice(0, n) for n in self.info.np_shape) if self.cut is None else self.cut.region

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def to_torch(self):
        """Zero-copy ``torch.Tensor`` through DLPack (bfloat16 bit patterns as torch.bfloat16), on
        the array's own device (``cuda:N`` for a tensor on GPU N)."""
        import torch

        if isinstance(self.array, np.ndarray):
            t = torch.from_dlpack(self.array)
        else:  # DLPack carries the device; its stream hand-over runs with that device current
            import cupy

            with cupy.cuda.Device(self.array.device.id):
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
    ``wall_s`` (from the start of the load, on a GPU its wait for a warm-up and its device clock
    included, to the last byte in place), ``gb_s``, the
    ``options`` used, the ``backend`` name, the ``profile`` (spans; None with ``profile=False``) and
    the ``path`` of the file. A sharded load (``shard=``) also says ``wanted_bytes`` (the shards'
    share of the file: ``file_bytes`` exceeds it by the covering blocks of unaligned column shards)
    and ``whole_bytes`` (the whole tensors' bytes). ``to_torch()`` gives every tensor as a ``torch.Tensor`` without copies
    (needs torch). A load over several devices also has ``placement`` (a DataFrame: tensor,
    device, layer, type, file and output bytes) and ``device_summary()`` (each device's share,
    need and free bytes, and with a profile the GB/s it received); ``place`` is the ``Placement``."""

    tensors: dict[str, DeviceTensor]
    file_bytes: int
    out_bytes: int
    wall_s: float
    options: LoadOptions
    backend: str
    profile: Profile | None = None
    path: str | None = None
    place: Placement | None = None
    wanted_bytes: int | None = None  # a sharded load: the shards' share of the file bytes
    whole_bytes: int | None = None  # a sharded load: the file bytes of the whole tensors

    @property
    def devices(self) -> tuple[int, ...]:
        """The device indices the tensors are on."""
        return self.place.devices if self.place is not None else tuple(sorted({t.device for t in self.tensors.values()}))

    @property
    def placement(self):
        """Tensor by tensor, the device it went to (pandas); None for a single-device load."""
        return None if self.place is None else self.place.frame()

    def device_summary(self):
        """Per device: its share of the placement (tensors, layers, bytes, need and free), and
        where the load was profiled, the bytes copied to it (``Profile.device_summary``: file bytes,
        or the dequantized output in cpu and sequential mode) and at what GB/s."""
        if self.place is None:
            raise ValueError("device_summary() describes a load over several devices (device=[...] or 'all')")
        df = self.place.summary()
        if self.profile is not None:
            got = self.profile.device_summary().set_index("device")
            df = df.join(got[["h2d_bytes", "h2d_busy_us", "h2d_gb_s", "gb_s"]], on="device")
        return df

    def __getitem__(self, k):
        try:
            return self.tensors[k]
        except KeyError:  # a GGUFLabError naming the file, and still a KeyError
            raise not_found(TensorNotFoundError, self.path, "tensor loaded named", k, self.tensors) from None

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
        on = f", devices={list(self.place.devices)}" if self.place is not None else ""
        return (f"<LoadResult {len(self.tensors)} tensors, {self.file_bytes / 1e9:.3f} GB in {self.wall_s:.3f} s "
                f"({self.gb_s:.3g} GB/s), mode={self.options.mode}, backend={self.backend}{on}>")


def alloc_outputs(backend: Backend, tensors: Sequence[TensorInfo], mode: str, dtype: str,
                  cuts: Mapping[str, Cut] | None = None) -> dict[str, DeviceTensor]:
    """Flat outputs: a tensor's elements (its bytes in raw mode), or of a shard the expansion of
    its covering blocks (sliced to the shard by ``finish_shapes`` when they hold more)."""
    out: dict[str, DeviceTensor] = {}
    for t in tensors:
        logical, store = out_kind(t, mode, dtype)
        c = cuts.get(t.name) if cuts else None
        if c is None or c.shard is None:
            n = t.n_bytes if mode == "raw" else t.n_elements
        else:
            n = c.read_bytes if mode == "raw" else c.landing_elements()
        out[t.name] = DeviceTensor(t, backend.empty(n, store), logical, mode, backend.device, c)
    return out


def finish_shapes(result: dict[str, DeviceTensor]) -> None:
    """Outputs were filled flat; give the dequantized ones their tensor's (or shard's) shape
    (raw stays bytes). A shard read as covering blocks keeps only its own columns (one 2-D copy)."""
    for dt in result.values():
        if dt.dtype == "raw":
            continue
        c = dt.cut
        if c is not None and not c.aligned:
            landing = dt.array.reshape(c.outer, -1)[:, c.head:c.head + c.seg]
            if isinstance(landing, np.ndarray):
                dt.array = landing.copy()
            else:  # CuPy: the copy runs on the array's device
                import cupy

                with cupy.cuda.Device(dt.device):
                    dt.array = landing.copy()
        shape = dt.info.np_shape if c is None else c.np_shape
        dt.array = dt.array.reshape(shape)


def check_memory(backend: Backend, path: str, tensors: Sequence[TensorInfo], mode: str, dtype: str, extra: int,
                 cuts: Mapping[str, Cut] | None = None) -> None:
    """Fail before allocating anything when the outputs (and ``extra`` bytes) cannot fit."""
    need = extra + sum(output_bytes(t, mode, dtype, cuts.get(t.name) if cuts else None) for t in tensors)
    free = backend.mem_free()
    if free is not None and need > free:
        raise DeviceMemoryError(f"{path}: loading {len(tensors)} tensors ({mode}, {dtype}) needs {need} bytes of "
                                f"device memory; {free} bytes are free")
