"""Placing a load's tensors on several devices (pure): which device each tensor goes to, and
whether each device's share fits in its free memory, decided before anything is allocated.

The default splits the model by layer, as transformers' ``device_map="auto"`` and llama.cpp's
``--tensor-split`` do: embeddings on the first device, the blocks in order, each device taking a
run of whole blocks in proportion to its free memory, the final norm and the output on the last.
"""

from __future__ import annotations

import bisect
import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ..errors import DeviceMemoryError, GGUFLabError
from ..model import TensorInfo
from ..naming import layer_key
from .plan import output_bytes


def single_device(device) -> int | None:
    """The index when ``device`` names one device (an int, or a NumPy integer), else None (a list
    of devices or ``"all"``: a load over several)."""
    if isinstance(device, (str, bool)) or not hasattr(device, "__index__"):
        return None
    d = operator.index(device)
    if d < 0:  # as the command line's --device refuses it
        raise GGUFLabError(f"device must be an index of 0 or more, a list of indices or 'all', got {device!r}")
    return d


def several_devices(device, placement=None) -> bool:
    """Whether ``device`` asks for a load over several devices (a list of indices or ``"all"``);
    a ``placement`` with one device is an error, since it only spreads tensors over several."""
    if single_device(device) is None:
        return True
    if placement is not None:
        raise GGUFLabError(f"placement spreads tensors over several devices: pass device=[...] or 'all' "
                           f"(got device={device!r})")
    return False


def resolve_devices(device, count: int | None) -> tuple[int, ...]:
    """The load's devices from ``device``: ``"all"``, or a sequence of distinct indices.
    ``count``: how many devices there are (None: any index goes, as on the host backend).

    Example:
        >>> resolve_devices([1, 0], 2), resolve_devices("all", 2)
        ((1, 0), (0, 1))
    """
    if isinstance(device, str):
        if device != "all":
            raise GGUFLabError(f"device must be an index, a list of indices or 'all', got {device!r}")
        return tuple(range(count or 1))
    try:
        devices = tuple(device)
    except TypeError:
        raise GGUFLabError(f"device must be an index, a list of indices or 'all', got {device!r}") from None
    if not devices:
        raise GGUFLabError("device: the list of devices is empty")
    for d in devices:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0 or (count is not None and d >= count):
            where = f"from 0 to {count - 1}" if count is not None else "at least 0"
            raise GGUFLabError(f"device {d!r} is not a device here: indices are {where}")
    if len(set(devices)) != len(devices):
        raise GGUFLabError(f"device {list(devices)}: a device is named twice")
    return devices


@dataclass(frozen=True)
class Placement:
    """Where each tensor of a load goes. ``where``: tensor name to device; ``out_bytes``: each
    tensor's bytes on the device; ``free``: each device's free bytes when placed (None: unknown);
    ``reserve``: bytes each device needs beside the outputs (the staging scratch)."""

    devices: tuple[int, ...]
    tensors: tuple[TensorInfo, ...]
    where: Mapping[str, int]
    out_bytes: Mapping[str, int]
    free: Mapping[int, int | None]
    reserve: Mapping[int, int]

    def on(self, device: int) -> list[TensorInfo]:
        """The tensors placed on ``device``, in load order."""
        return [t for t in self.tensors if self.where[t.name] == device]

    def need(self, device: int) -> int:
        """Bytes ``device`` needs: its outputs and its reserve."""
        return sum(self.out_bytes[t.name] for t in self.on(device)) + self.reserve.get(device, 0)

    def frame(self):
        """One row per tensor: tensor, device, layer, type, file_bytes, out_bytes (pandas)."""
        import pandas as pd

        ts = self.tensors
        return pd.DataFrame({
            "tensor": [t.name for t in ts], "device": [self.where[t.name] for t in ts],
            "layer": pd.array([t.layer for t in ts], dtype="Int64"), "type": [t.type_name for t in ts],
            "file_bytes": [t.n_bytes for t in ts], "out_bytes": [self.out_bytes[t.name] for t in ts]})

    def summary(self):
        """One row per device: tensors, the layers (blocks) it holds, file bytes, output bytes,
        bytes needed (outputs and reserve), bytes free, and whether it fits (pandas)."""
        import pandas as pd

        rows = []
        for d in self.devices:
            mine = self.on(d)
            layers = sorted({t.layer for t in mine if t.layer is not None})
            need, free = self.need(d), self.free.get(d)
            rows.append({"device": d, "tensors": len(mine), "layers": _ranges(layers),
                         "file_bytes": sum(t.n_bytes for t in mine),
                         "out_bytes": sum(self.out_bytes[t.name] for t in mine), "need_bytes": need,
                         "free_bytes": free, "fits": free is None or need <= free})
        return pd.DataFrame(rows, columns=["device", "tensors", "layers", "file_bytes", "out_bytes", "need_bytes",
                                           "free_bytes", "fits"])

    def check(self, path: str) -> None:
        """Raise ``DeviceMemoryError`` naming every device's need and free bytes when any
        device's share does not fit; nothing has been allocated yet when it does."""
        short = [d for d in self.devices if self.free.get(d) is not None and self.need(d) > self.free[d]]
        if not short:
            return
        parts = []
        for d in self.devices:
            free = self.free.get(d)
            state = "unknown free" if free is None else f"{free} bytes ({free / 1e9:.2f} GB) free"
            mark = " (short)" if d in short else ""
            parts.append(f"device {d} needs {self.need(d)} bytes ({self.need(d) / 1e9:.2f} GB), {state}{mark}")
        raise DeviceMemoryError(f"{path}: the placement of {len(self.tensors)} tensors does not fit: "
                                + "; ".join(parts))

    def __str__(self):
        return self.summary().to_string(index=False)


def _ranges(xs: Sequence[int]) -> str:
    """ "0-15, 20" for [0, ..., 15, 20]: the blocks a device holds, briefly."""
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


def place(tensors: Sequence[TensorInfo], devices: Sequence[int], mode: str, dtype: str,
          free: Mapping[int, int | None], reserve: Mapping[int, int] | None = None, placement=None) -> Placement:
    """Place ``tensors`` on ``devices``. ``placement``: None (by layer, in proportion to free
    memory), a mapping of tensor names or dotted name prefixes (``"blk.3"``; ``""`` for the rest)
    to devices, a DataFrame with ``tensor`` and ``device`` columns (a result's ``placement``), or
    a function of ``TensorInfo`` giving a device.

    Example:
        >>> p = place(model.tensors, [0, 1], "gpu", "float16", free={0: None, 1: None})
        >>> p.where["token_embd.weight"], p.where["output.weight"]
        (0, 1)
    """
    devices = tuple(devices)
    reserve = dict(reserve or {})
    out = {t.name: output_bytes(t, mode, dtype) for t in tensors}
    if placement is None:
        where = by_layer(tensors, devices, out, {d: _room(free.get(d), reserve.get(d, 0)) for d in devices})
    else:
        pick = _picker(placement)
        where = {t.name: pick(t) for t in tensors}
        for t in tensors:
            d = where[t.name]
            if isinstance(d, bool) or not isinstance(d, int) or d not in devices:
                raise GGUFLabError(f"placement puts tensor {t.name!r} on device {d!r}, which is not one of the "
                                   f"load's devices {list(devices)}")
    return Placement(devices, tuple(tensors), where, out, dict(free), reserve)


def _room(free: int | None, reserve: int) -> int | None:
    return None if free is None else max(0, free - reserve)


def _picker(placement) -> Callable[[TensorInfo], Any]:
    if callable(placement):
        return placement
    if hasattr(placement, "columns"):  # a previous load's result.placement
        placement = dict(zip(placement["tensor"], placement["device"]))
    if not isinstance(placement, Mapping):
        raise GGUFLabError(f"placement must be None, a mapping of tensor names to devices, a DataFrame or a "
                           f"function of TensorInfo, got {type(placement).__name__}")
    table = {str(k): (int(v) if hasattr(v, "__index__") and not isinstance(v, bool) else v)
             for k, v in placement.items()}

    def pick(t: TensorInfo):
        parts = t.name.split(".")
        for n in range(len(parts), -1, -1):  # the name, then ever shorter dotted prefixes, then ""
            key = ".".join(parts[:n])
            if key in table:
                return table[key]
        raise GGUFLabError(f"placement has no device for tensor {t.name!r} (give its name, a dotted prefix "
                           "such as 'blk.3', or '' for every tensor not named)")

    return pick


def by_layer(tensors: Sequence[TensorInfo], devices: Sequence[int], out: Mapping[str, int],
             room: Mapping[int, int | None]) -> dict[str, int]:
    """Embeddings on the first device, the rest outside every block (final norm, output) on the
    last, the blocks in order between, each device taking whole blocks in proportion to its room
    (equal shares where a device's free memory is unknown)."""
    units = _units(tensors)
    weights = [room[d] for d in devices]
    if any(w is None for w in weights) or sum(weights) == 0:
        weights = [1] * len(devices)
    total = sum(out[t.name] for _, ts in units for t in ts)
    acc, bounds = 0, []
    for w in weights:
        acc += w
        bounds.append(total * acc / sum(weights))
    where, cum = {}, 0
    for kind, ts in units:
        size = sum(out[t.name] for t in ts)
        if kind == 0:
            k = 0
        elif kind == 2:
            k = len(devices) - 1
        else:  # the device whose share holds this block's middle byte
            k = min(bisect.bisect_left(bounds, cum + size / 2), len(devices) - 1)
        cum += size
        for t in ts:
            where[t.name] = devices[k]
    return where


def _units(tensors: Sequence[TensorInfo]) -> list[tuple[int, list[TensorInfo]]]:
    """The tensors in layer order, grouped into what is placed whole: a block (every tensor of
    ``blk.N``, of ``v.blk.N``...), or one tensor outside the blocks. Kind 0: embeddings, 1: a
    block, 2: the rest (norms, output, projector)."""
    key = layer_key(tensors)
    units: list[tuple[int, list[TensorInfo]]] = []
    last = None
    for t in sorted(tensors, key=key):
        k = key(t)
        if k[0] == 1 and last == k[:3]:
            units[-1][1].append(t)
        else:
            units.append((k[0], [t]))
        last = k[:3] if k[0] == 1 else None
    return units
