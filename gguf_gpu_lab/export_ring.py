"""The export's way out of the GPU: a small ring of pinned host buffers between the device tensors
and the files. The main thread copies each tensor's bytes into the next free buffer (a tensor
larger than a buffer goes in pieces; small ones share a buffer) with an asynchronous copy on a side
stream and an event per buffer; writer threads wait for a buffer's event, ``pwrite`` its pieces at
their file offsets and hand it back. Host memory is the ring (``RING_BUFFERS`` x
``RING_BUFFER_BYTES``, 256 MiB), whatever the batch.

The copying is a ``copier`` (``begin()``, ``copy(dst, src)``, ``mark()``): ``DeviceToHost`` on a
GPU, ``HostCopy`` (plain ``copy_``, nothing to wait for) to run the same ring on the host, so that
its pieces and offsets are tested on any machine.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

RING_BUFFERS = 4  # one filling while the writers write the others
RING_BUFFER_BYTES = 64 << 20  # D2H copies of 64 MiB run at the copy engine's speed (DESIGN.md's table)
RING_WRITERS = 3
_MIN_BUFFER_BYTES = 64 << 10


def ring_buffer_bytes(budget: int) -> int:
    """Each buffer's size for a host budget: ``RING_BUFFER_BYTES``, less when ``budget`` is smaller
    than the ring (a quarter of it each), at least 64 KiB."""
    return min(RING_BUFFER_BYTES, max(_MIN_BUFFER_BYTES, budget // RING_BUFFERS))


class HostCopy:
    """The ring's copies on the host: synchronous, so every buffer is ready at once."""

    class _Ready:
        def synchronize(self) -> None:
            pass

    def begin(self) -> None:
        pass

    def copy(self, dst, src) -> None:
        dst.copy_(src)

    def mark(self):
        return self._Ready()


class DeviceToHost:
    """Device to pinned host memory on a side stream of ``device``: ``begin()`` makes the stream
    wait for the work queued so far on the current stream (the tensors' transforms); ``mark()``
    records an event after the copies queued since the last mark."""

    def __init__(self, torch, device):
        self.torch = torch
        self.stream = torch.cuda.Stream(device=device)

    def begin(self) -> None:
        self.stream.wait_stream(self.torch.cuda.current_stream(self.stream.device))

    def copy(self, dst, src) -> None:
        with self.torch.cuda.stream(self.stream):  # copy_ queues on the current stream
            dst.copy_(src, non_blocking=True)

    def mark(self):
        ev = self.torch.cuda.Event()
        ev.record(self.stream)
        return ev


def pinned_buffers(torch, n: int, nbytes: int) -> list:
    """``n`` pinned host buffers (uint8 tensors). They come from torch's caching host allocator and
    go back to it when dropped: the next export reuses them (``torch._C._host_emptyCache()``
    returns them to the system)."""
    return [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(n)]


class Ring:
    """Buffers between tensors (flat uint8, on any device) and files.

    Args:
        buffers: host uint8 tensors, all free.
        copier: ``HostCopy()`` or ``DeviceToHost(torch, device)``.
        write: ``write(fd, data, offset, file, name)``, ``data`` a uint8 numpy array; raises on a
            failed write (naming the file and the tensor).
        writers: writer threads.
        progress: ``progress(done, total, name)`` after each piece is written, or None.
        total: the bytes ``progress`` counts to.

    ``put`` each tensor, then leave the ``with`` block: the last buffer is written, the writers are
    joined, and the first failed write is raised (from ``put`` as soon as it is seen). Leaving with
    an error writes nothing more and joins the writers all the same. A source tensor is kept alive
    until the copies out of it are done (its device memory is not reused under them).
    """

    def __init__(self, buffers: list, copier, write: Callable, writers: int = RING_WRITERS,
                 progress: Callable | None = None, total: int = 0):
        self.copier, self.write, self.progress, self.total = copier, write, progress, total
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for b in buffers:
            self.free.put(b)
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.failed: list[BaseException] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.done = 0
        self.cur = None  # [buffer, bytes used, pieces, sources]
        self.threads = [threading.Thread(target=self._writer, name=f"gguf-lab-export-write-{i}", daemon=True)
                        for i in range(writers)]
        for t in self.threads:
            t.start()

    def __enter__(self) -> "Ring":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                self.stop.set()  # nothing more is written; the writers still wait for the copies
            self.flush()
        finally:
            for _ in self.threads:
                self.jobs.put(None)
            for t in self.threads:
                t.join()
        if exc_type is None and self.failed:
            raise self.failed[0]

    def begin(self) -> None:
        """Before the tensors of a batch: the copies wait for the work that made them."""
        self.copier.begin()

    def put(self, src, fd: int, offset: int, file: str, name: str) -> None:
        """``src`` (a contiguous flat uint8 tensor) to ``file`` (open as ``fd``) at ``offset``."""
        n, pos = src.numel(), 0
        while pos < n:
            if self.cur is None:
                self.cur = [self._take(), 0, [], []]
            buf, used, pieces, sources = self.cur
            k = min(n - pos, buf.numel() - used)
            self.copier.copy(buf[used:used + k], src[pos:pos + k])
            pieces.append((used, k, fd, offset + pos, file, name))
            if not sources or sources[-1] is not src:
                sources.append(src)
            self.cur[1] = used + k
            pos += k
            if used + k == buf.numel():
                self.flush()

    def flush(self) -> None:
        """The buffer being filled goes to the writers now."""
        if self.cur is not None and self.cur[2]:
            buf, _, pieces, sources = self.cur
            self.jobs.put((buf, pieces, sources, self.copier.mark()))
            self.cur = None

    def _take(self):
        buf = self.free.get()  # the writers hand every buffer back, failed or not
        if self.failed:
            self.free.put(buf)
            raise self.failed[0]
        return buf

    def _writer(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            buf, pieces, sources, ready = job
            try:
                ready.synchronize()
                sources.clear()
                if self.failed or self.stop.is_set():
                    continue
                for at, k, fd, offset, file, name in pieces:
                    self.write(fd, buf[at:at + k].numpy(), offset, file, name)
                    if self.progress is not None:
                        with self.lock:
                            self.done += k
                            self.progress(self.done, self.total, name)
            except BaseException as e:  # (raised on the main thread, from put or the with block's end)
                with self.lock:
                    self.failed.append(e)
            finally:
                sources.clear()
                self.free.put(buf)
