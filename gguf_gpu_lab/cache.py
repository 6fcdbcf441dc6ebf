"""The device tensor cache (LRU under a byte budget) and background preloading."""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from .errors import LoadCancelled, warn


class TensorCache:
    """LRU cache of loaded tensors under a byte budget. A key being loaded is *in flight*: other
    callers wait for that load instead of starting their own, so each tensor loads once."""

    def __init__(self, budget_bytes: int | None = None):
        self.budget = budget_bytes
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._inflight: dict[Hashable, Future] = {}
        self._lock = threading.Lock()
        self._tls = threading.local()
        self.hits = self.misses = self.loads = self.evictions = 0

    def _size(self, v) -> int:
        return int(getattr(v, "nbytes", 0))

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(self._size(v) for v in self._data.values())

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._data

    def claim(self, keys) -> list:
        """Mark the keys neither cached nor in flight as in flight; return those (the caller
        must then ``fulfill`` or ``fail`` each)."""
        out = []
        with self._lock:
            for k in keys:
                if k not in self._data and k not in self._inflight:
                    self._inflight[k] = Future()
                    out.append(k)
        return out

    def fulfill(self, key, value) -> None:
        with self._lock:
            self.loads += 1
            self._data[key] = value
            self._data.move_to_end(key)
            self._evict_locked(keep=key)
            fut = self._inflight.pop(key, None)
        if fut is not None:
            fut.set_result(value)

    def fail(self, key, exc: BaseException) -> None:
        with self._lock:
            fut = self._inflight.pop(key, None)
        if fut is not None:
            fut.set_exception(exc)

    def get_or_load(self, key, load: Callable[[], Any]):
        while True:
            try:
                return self._get_or_load(key, load)
            except LoadCancelled:
                # a load this caller was waiting on (a cancelled preload) gave up: try again,
                # unless this caller's own load was the one cancelled
                if self._last_owner_cancelled(key):
                    raise

    def _last_owner_cancelled(self, key) -> bool:
        return getattr(self._tls, "owner_cancelled", None) == key

    def _get_or_load(self, key, load: Callable[[], Any]):
        self._tls.owner_cancelled = None
        with self._lock:
            if key in self._data:
                self.hits += 1
                self._data.move_to_end(key)
                return self._data[key]
            fut = self._inflight.get(key)
            owner = fut is None
            if owner:
                self.misses += 1
                fut = self._inflight[key] = Future()
            else:
                self.hits += 1
        if not owner:
            return fut.result()
        try:
            value = load()
        except BaseException as e:
            if isinstance(e, LoadCancelled):
                self._tls.owner_cancelled = key
            self.fail(key, e)
            raise
        self.fulfill(key, value)
        return value

    def _evict_locked(self, keep=None) -> None:
        if self.budget is None:
            return
        total = sum(self._size(v) for v in self._data.values())
        for k in list(self._data):
            if total <= self.budget:
                break
            if k == keep:
                continue
            total -= self._size(self._data.pop(k))
            self.evictions += 1

    def evict(self, match: Callable[[Hashable], bool] | None = None) -> int:
        """Drop cached entries (all, or those whose key matches); returns bytes freed."""
        with self._lock:
            keys = [k for k in self._data if match is None or match(k)]
            freed = sum(self._size(self._data.pop(k)) for k in keys)
            self.evictions += len(keys)
        return freed

    def info(self) -> dict[str, Any]:
        with self._lock:
            return {"entries": len(self._data), "bytes": sum(self._size(v) for v in self._data.values()),
                    "budget": self.budget, "hits": self.hits, "misses": self.misses, "loads": self.loads,
                    "evictions": self.evictions, "in_flight": len(self._inflight)}


@dataclass
class PreloadProgress:
    bytes_done: int
    bytes_total: int
    tensors_done: int
    tensors_total: int
    current: str | None


class PreloadHandle:
    """A background preload: ``progress``, ``wait()``, ``cancel()``. ``take(name)`` removes a
    tensor from the queue so that a caller can load it at once (``GGUFModel.tensor`` does)."""

    def __init__(self, names: list[str], sizes: dict[str, int], run_batch: Callable[[list[str], threading.Event], None],
                 batch_bytes: int, on_end: Callable[[], None] | None = None):
        self._on_end = on_end  # called once the preload ends, however it ends (closes its bar)
        self._queue = deque(names)
        self._sizes = sizes
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._run_batch = run_batch
        self._batch_bytes = batch_bytes
        self.error: BaseException | None = None
        self._done_bytes = 0
        self._done_n = 0
        self._total = sum(sizes[n] for n in names)
        self._total_n = len(names)  # tensors, like the bytes: every one queued, less those taken
        self._current: str | None = None
        self._thread = threading.Thread(target=self._main, name="gguf-lab-preload", daemon=True)

    def start(self, background: bool) -> "PreloadHandle":
        if background:
            self._thread.start()
        else:
            self._main()
            if self.error is not None:
                raise self.error
        return self

    def _next_batch(self) -> list[str]:
        with self._lock:
            batch, size = [], 0
            while self._queue and (not batch or size + self._sizes[self._queue[0]] <= self._batch_bytes):
                n = self._queue.popleft()
                batch.append(n)
                size += self._sizes[n]
            self._current = batch[0] if batch else None
            return batch

    def _main(self) -> None:
        try:
            while not self._cancel.is_set():
                batch = self._next_batch()
                if not batch:
                    return
                self._run_batch(batch, self._cancel)
                with self._lock:
                    self._done_bytes += sum(self._sizes[n] for n in batch)
                    self._done_n += len(batch)
        except LoadCancelled:
            pass
        except BaseException as e:  # kept for wait() to re-raise
            self.error = e
        finally:
            with self._lock:
                self._current = None
            if self._on_end is not None:
                self._on_end()

    def take(self, name: str) -> bool:
        """Remove ``name`` from the queue; True if it was still waiting there."""
        with self._lock:
            try:
                self._queue.remove(name)
            except ValueError:
                return False
            self._total -= self._sizes[name]
            self._total_n -= 1
            return True

    @property
    def progress(self) -> PreloadProgress:
        with self._lock:
            return PreloadProgress(self._done_bytes, self._total, self._done_n, self._total_n, self._current)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the preload to end; re-raise its error. True if it ended."""
        if self._thread.ident is not None:
            self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.done()

    @property
    def cancelled(self) -> bool:
        """True once ``cancel()`` was called: ``wait()`` then returns True with the tensors left
        unloaded (``progress`` says how many were)."""
        return self._cancel.is_set()

    def __repr__(self) -> str:
        p = self.progress
        state = ("failed" if self.error is not None else "cancelled" if self.cancelled else
                 "running" if self._thread.is_alive() else "done")
        return (f"<PreloadHandle {state}: {p.tensors_done} of {p.tensors_total} tensors, "
                f"{p.bytes_done / 2**20:.1f} of {p.bytes_total / 2**20:.1f} MiB>")

    def cancel(self) -> None:
        """Stop after the tensors in flight; what was loaded stays cached (``cancelled`` is True)."""
        self._cancel.set()
        with self._lock:
            self._queue.clear()
        if self._thread.ident is not None:
            self._thread.join()


# -- the model's lazy loads: the cache sits above the model and the loader, which know nothing of it

class _ModelState:
    """What the lazy cache keeps for one open model: its tensor cache, its running preload and
    its placements over several devices. Made once per model, under a lock."""

    def __init__(self, model):
        self.lock = threading.Lock()
        self.tensors = TensorCache(model.cache_budget)
        self.preload: PreloadHandle | None = None
        self.placements: dict = {}

    def close(self) -> None:
        with self.lock:
            handle, self.preload = self.preload, None
        if handle is not None:
            handle.cancel()
        self.tensors.evict()


_STATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def _state(model, create: bool = True) -> "_ModelState | None":
    with _STATES_LOCK:
        st = _STATES.get(model)
        if st is None and create:
            st = _STATES[model] = _ModelState(model)
            model.on_close(st.close)
    if st is not None:
        st.tensors.budget = model.cache_budget
    return st


def model_placement(model, device, placement, backend, mode: str, dtype: str):
    """The placement the model's cache uses for these devices: made over every tensor of the
    model the first time, then kept, so each tensor always goes to the same device."""
    from .loader import backends_for, plan_placement

    st = _state(model)
    devices, backends = backends_for(backend, device)
    key = (devices, backends[0].name, mode, dtype, _placement_key(placement))
    with st.lock:
        if key not in st.placements:
            st.placements[key] = plan_placement(model.tensors, devices, backends, mode, dtype, placement)
        return st.placements[key]


def _placement_key(placement):
    if placement is None or callable(placement):
        return placement
    if hasattr(placement, "columns"):
        return tuple(zip(placement["tensor"], placement["device"]))
    return tuple(sorted(placement.items()))


def tensor(model, name: str, dtype: str, mode: str, backend, device, placement=None):
    """``GGUFModel.tensor``: one tensor from the model's cache, loaded on first use; a tensor
    still queued in a running preload is taken out of its queue and loaded at once."""
    from .device import get_backend
    from .loader import load, several_devices, single_device

    model.info(name)
    model.source  # noqa: B018  (a closed model raises here)
    st = _state(model)
    with st.lock:
        handle = st.preload
    if handle is not None:
        handle.take(name)
    if several_devices(device, placement):
        pl = model_placement(model, device, placement, backend, mode, dtype)
        device, backend = pl.where[name], get_backend(backend, 0).name
    device = single_device(device)
    be = get_backend(backend, device)
    key = (name, mode, dtype, be.name, device)  # the host's device 0 is not the GPU's
    return st.tensors.get_or_load(
        key, lambda: load(model, mode=mode, dtype=dtype, tensors=[name], backend=be, device=device,
                          profile=False)[name])


# what preload passes on to each batch's load: how it reads, never what it makes
PRELOAD_LOAD_OPTIONS = frozenset({"streams", "chunk_mb", "readers", "staging_mb", "read", "progress"})


def preload(model, order, background: bool, dtype: str, mode: str, tensors, backend, device, batch_mb: float,
            load_options: dict, placement=None) -> "PreloadHandle":
    """``GGUFModel.preload``: tensors into the model's cache in batches of about ``batch_mb``;
    over several devices, each batch loads onto every device at once. One preload at a time per
    model: the check and the setting of the handle are one step under the model's lock."""
    from .device import get_backend
    from .errors import GGUFLabError
    from .loader import load, select, several_devices
    from .progress import LoadBar, check_progress, reporter

    other = sorted(set(load_options) - PRELOAD_LOAD_OPTIONS)
    if other:  # shard= would cache a part under the whole tensor's name; the rest are preload's own
        raise GGUFLabError(f"preload takes the load options {', '.join(sorted(PRELOAD_LOAD_OPTIONS))}, not "
                           f"{', '.join(other)} (it caches whole tensors: load(..., shard=...) loads parts)")
    progress = load_options.pop("progress", None)
    check_progress(progress)  # before any work
    if isinstance(batch_mb, bool) or not isinstance(batch_mb, (int, float)) or not 0 < batch_mb <= 1 << 20:
        raise GGUFLabError(f"batch_mb must be more than 0 and at most {1 << 20} (MiB a batch), got {batch_mb!r}")

    model.source  # noqa: B018  (a closed model raises here)
    if several_devices(device, placement):
        pl = model_placement(model, device, placement, backend, mode, dtype)
        on = pl.where
        be_name = get_backend(backend, 0).name
        target = {"backend": be_name, "device": list(pl.devices)}
    else:
        on = None
        be = get_backend(backend, device)
        be_name = be.name
        target = {"backend": be, "device": device}
    st = _state(model)
    cache = st.tensors
    key_of = lambda n: (n, mode, dtype, be_name, device if on is None else on[n])  # noqa: E731
    names = [t.name for t in select(model.tensors, tensors, order)]
    names = [n for n in names if key_of(n) not in cache]
    sizes = {t.name: t.n_bytes for t in model.tensors}
    _warn_over_budget(model, names, mode, dtype, cache.budget)

    def run_batch(batch, cancel):
        keys = {n: key_of(n) for n in batch}
        claimed = set(cache.claim(keys.values()))
        todo = [n for n in batch if keys[n] in claimed]
        if not todo:
            return
        where = {} if on is None else {"placement": {n: on[n] for n in todo}}
        try:
            r = load(model, mode=mode, dtype=dtype, tensors=todo, cancel=cancel, profile=False, **target, **where,
                     progress=None if report is None else relay, **load_options)
        except BaseException as e:
            for n in todo:
                cache.fail(keys[n], e)
            raise
        for n in todo:
            cache.fulfill(keys[n], r[n])

    # one report for the whole preload (a bar made here, on the caller's thread): each batch's
    # counts added to the bytes of the batches before it
    report = reporter(progress, "preload", sum(sizes[n] for n in names))

    def relay(done, total, name=None):
        p = handle.progress
        return report(p.bytes_done + done, p.bytes_total, name)

    handle = PreloadHandle(names, sizes, run_batch, int(batch_mb * (1 << 20)),
                           report.close if isinstance(report, LoadBar) else None)
    with st.lock:
        running = st.preload is not None and not st.preload.done()
        if not running:  # set before it starts, so tensor() calls from other threads can take from its queue
            st.preload = handle
    if running:
        if isinstance(report, LoadBar):
            report.close()
        raise GGUFLabError(f"{model.path}: a preload is already running; cancel() or wait() for it first")
    return handle.start(background)


def evict(model, name: str | None = None) -> int:
    """``GGUFModel.evict``: drop cached device tensors (all, or every mode/dtype of one)."""
    st = _state(model, create=False)
    if st is None:
        return 0
    return st.tensors.evict(None if name is None else (lambda k: k[0] == name))


def _warn_over_budget(model, names: list[str], mode: str, dtype: str, budget: int | None) -> None:
    """A preload larger than the cache's budget evicts what it loaded first: say so, once, before."""
    if budget is None or not names:
        return
    from .loader.plan import output_bytes

    need = sum(output_bytes(model.info(n), mode, dtype) for n in names)
    if need > budget:
        warn(f"{model.path}: this preload makes {need / 2**20:.1f} MiB of tensors, more than the cache's budget "
             f"({budget / 2**20:.1f} MiB, cache_budget): the first ones loaded will be evicted")


def info(model) -> dict[str, Any]:
    """``GGUFModel.cache_info``."""
    return _state(model).tensors.info()


def _register() -> None:
    import sys

    from .model import register

    register("cache", sys.modules[__name__])


_register()
