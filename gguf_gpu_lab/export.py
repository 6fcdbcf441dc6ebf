"""A GGUF file to a Hugging Face model folder: ``config.json``, ``generation_config.json``, the
tokenizer files, and the weights as safetensors shards (``model.safetensors``, or
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json`` when split), with
transformers' names and transforms exactly as ``hf.from_gguf`` makes them, for any engine that
reads such a folder (vLLM, SGLang, TGI, transformers).

Streaming, with bounded memory: the tensors are dequantized by ``load()`` in batches of at most
half the ``budget`` and transformed by transformers' own processors; every shard's header is known
from the shapes before any weight is read, so each tensor is written at its final offset while the
next batch expands.

- On a GPU (``gpu`` mode) a batch stays on the device; its bytes leave through a small ring of
  pinned host buffers (``export_ring``: 4 x 64 MiB, less for a budget under 256 MB), copied on a
  side stream with an event per buffer, a tensor larger than a buffer in pieces, and written by
  three writer threads that hand each buffer back. The host holds the ring, not the batch; the
  budget bounds the device's batches instead (two at a time, the one expanding and the one
  leaving).
- On the host backend a batch is written by one writer thread while the next expands, at most
  ``budget`` bytes of weights at once (two batches; a tensor larger than half the budget is a batch
  of its own). Freed batches go back to the system at once (a fixed glibc mmap threshold, see
  ``_return_freed_memory``), so the process's peak memory is what the budget says.

Everything is written into a temporary folder beside ``out_dir`` and moved into place at the end,
the index (or the single shard) last: a half-done export never looks complete, and a failed one
(a full disk, a failed load) leaves nothing behind, its threads joined.

    export("model.gguf", "model-hf")      # then AutoModelForCausalLM.from_pretrained("model-hf")
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from .errors import GGUFLabError, OutputExistsError
from .export_layout import INDEX_NAME, ST_DTYPES, WEIGHTS_NAME, Entry, Layout, batches, parse_size, plan_layout
from .export_ring import RING_BUFFERS, DeviceToHost, Ring, pinned_buffers, ring_buffer_bytes
from .model import GGUFModel, shared_model
from .outputs import partial_path, pwrite_all, warn_partials_left
from .progress import check_progress

__all__ = ["export", "ExportResult", "plan_layout", "batches", "parse_size", "INDEX_NAME", "WEIGHTS_NAME"]

_SPARE = 16 << 20  # disk room for config and tokenizer files beyond their estimate
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


# -- the writing ----------------------------------------------------------------------------------

class _Budget:
    """Host bytes in flight: taking waits until the bytes fit, or until nothing else is held (one
    tensor larger than the budget still passes, alone)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.cond = threading.Condition()

    def take(self, n: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n

    def give(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


def _pwrite(fd: int, data, offset: int, file: str, name: str) -> None:
    try:
        pwrite_all(fd, data, offset)
    except OSError as e:
        raise GGUFLabError(f"{file}: writing tensor {name!r} at byte {offset + e.written}: "
                           f"{e.strerror or type(e).__name__}") from None


@dataclass(frozen=True)
class ExportResult:
    out_dir: str
    files: tuple[str, ...]
    n_tensors: int
    weight_bytes: int  # the shards' sizes together
    wall_s: float
    steps_s: dict

    @property
    def gb_s(self) -> float:
        return self.weight_bytes / self.wall_s / 1e9 if self.wall_s else float("inf")


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise GGUFLabError(f"{out_dir}: exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        n = len(os.listdir(out_dir))
        raise GGUFLabError(f"{out_dir}: the folder exists and holds {n} entries; export into a new or empty folder, "
                           "or pass overwrite=True (--overwrite) to replace the export's files there")


def _check_space(folder: str, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if need > free:
        raise GGUFLabError(f"{folder}: the export needs {need / 1e9:.2f} GB ({need} bytes), the disk has "
                           f"{free / 1e9:.2f} GB free ({free} bytes)")


def _device_for(device: str):
    from . import hf_convert as hf

    if device == "auto":
        from .device import _cupy_or_reason

        import torch

        device = "cuda" if torch.cuda.is_available() and _cupy_or_reason()[1] is None else "cpu"
    try:
        return hf._device(device)
    except GGUFLabError as e:  # the export takes "auto" too
        raise GGUFLabError(str(e).replace("device must be ", "device must be 'auto', ", 1)) from None


def export(path, out_dir, dtype: str = "bfloat16", max_shard_size="5GB", overwrite: bool = False,
           progress: bool | Callable[[int, int, str], object] | None = True, *, budget="2GB",
           device: str = "auto", tokenizer: bool = True) -> ExportResult:
    """Write a Hugging Face model folder (safetensors) of a GGUF file.

    Args:
        path: a .gguf file (or an open ``GGUFModel``) of an architecture ``hf`` supports.
        out_dir: the folder to write; it must not exist or be empty, unless ``overwrite``.
        dtype: "bfloat16" (default), "float16" or "float32": every tensor is written in it.
        max_shard_size: largest shard, "5GB" (default; KB, MB, GB, TB: 1 GB = 10^9 bytes) or bytes,
            1KB to 10TB.
        overwrite: replace the export's files in a non-empty ``out_dir`` (other files stay;
            the model files of an earlier export that this one does not write, its
            ``model-NNNNN-of-NNNNN.safetensors`` and ``MODEL_FILES``, are removed). Without it, a folder filled while
            the export ran is an ``OutputExistsError`` at the end, and nothing of it is touched.
        progress: True (a bar where someone can watch it), False, or ``progress(done, total, name)``.
        budget: bytes the weights may take at once (default "2GB"), 1KB to 10TB: on the host
            backend, host memory (two batches of half of it); on a GPU, device memory of the
            batches (two of half of it, beside the load's scratch), while the host holds only the
            ring of pinned buffers (256 MiB, or the budget when it is smaller, 256 KiB at least).
            A tensor larger than the budget is still exported, alone: the bound is then that tensor.
        device: "auto" (the GPU where CuPy and torch see one, else the host backend), "cuda",
            "cuda:N" or "cpu".
        tokenizer: write the tokenizer files (``hf.tokenizer(path).save_pretrained``).

    Raises ``GGUFLabError`` before writing anything for an unsupported architecture, a bad
    argument, a non-empty ``out_dir`` or a disk with too little free space.

    Example:
        >>> r = export("model.gguf", tmp_path / "model-hf", progress=False)
        >>> r.files[:3]
        ('config.json', 'generation_config.json', 'model.safetensors')
    """
    from . import hf_convert as hf

    t0 = time.perf_counter()
    torch = hf._deps()
    if dtype not in ST_DTYPES:
        raise GGUFLabError(f"dtype must be one of {', '.join(ST_DTYPES)}, got {dtype!r}")
    shard_limit = parse_size(max_shard_size, "max_shard_size")
    limit = parse_size(budget, "budget")
    if tokenizer not in (True, False):
        raise GGUFLabError(f"tokenizer must be True or False, got {tokenizer!r}")
    check_progress(progress)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.islink(out_dir):  # a link to a folder: the export goes into that folder
        out_dir = os.path.realpath(out_dir)
    _check_out_dir(out_dir, overwrite)
    model = path if isinstance(path, GGUFModel) else shared_model(path)
    dev, backend, index = _device_for(device)
    conv = hf._Conversion(model, dtype)
    meta = conv.hf_model.state_dict()
    made = {conv.names[g]: g for g in conv.wanted}
    layout = plan_layout([(n, made[n], tuple(t.shape)) for n, t in meta.items() if n in made], dtype, shard_limit,
                         sum(p.numel() for p in conv.hf_model.parameters()))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    _check_space(parent, layout.total_bytes + 4 * model.data_offset + _SPARE)
    warn_partials_left(out_dir, "export")
    tmp = partial_path(out_dir)
    os.mkdir(tmp)  # (not mkdtemp: its 0700 would become the finished folder's mode)
    bar = None
    if progress is True:
        from .progress import ProgressBar

        bar = progress = ProgressBar(f"export {os.path.basename(out_dir)}")
    steps: dict[str, float] = {"prepare_s": time.perf_counter() - t0}
    def save_tokenizer() -> None:
        t = time.perf_counter()
        from .hf_tokenizer import tokenizer as hf_tokenizer

        hf_tokenizer(model).save_pretrained(tmp)
        _name_tokenizer_class_for_v4(tmp)
        steps["tokenizer_s"] = time.perf_counter() - t

    try:
        _write_configs(conv, tmp)
        # the tokenizer (a second or more for a large vocabulary, mostly Python) is built while the
        # weights stream: their threads wait on the device and the disk, not on the interpreter
        with ThreadPoolExecutor(1, thread_name_prefix="gguf-lab-export-tokenizer") as side:
            pending = side.submit(save_tokenizer) if tokenizer else None
            t1 = time.perf_counter()
            def tokenizer_failed() -> None:  # between batches: a tokenizer error ends the export now
                if pending is not None and pending.done():
                    pending.result()

            _write_weights(torch, conv, layout, tmp, backend, index, limit, progress or None, tokenizer_failed)
            steps["weights_s"] = time.perf_counter() - t1
            if pending is not None:
                pending.result()
        if layout.index is not None:
            with open(os.path.join(tmp, INDEX_NAME), "w", encoding="utf-8") as f:
                f.write(json.dumps(layout.index, indent=2, sort_keys=True) + "\n")
        files = tuple(sorted(os.listdir(tmp)))
        _move_into_place(tmp, out_dir, layout, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written export behind
        raise
    finally:
        if bar is not None:
            bar.close()
    steps["total_s"] = time.perf_counter() - t0
    return ExportResult(out_dir, files, len(layout.entries), layout.total_bytes, steps["total_s"], steps)


def _write_configs(conv, folder: str) -> None:
    """config.json and generation_config.json as ``save_pretrained`` writes them, config.json with
    the keys transformers 4 reads beside the ones 5 writes (``v4_config_keys``)."""
    hf_model = conv.hf_model
    hf_model.config.architectures = [type(hf_model).__name__]
    hf_model.config.save_pretrained(folder)
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    extra = {k: v for k, v in v4_config_keys(config).items() if k not in config}
    if extra:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps({**config, **extra}, indent=2, sort_keys=True) + "\n")
    if hf_model.can_generate() and getattr(hf_model, "generation_config", None) is not None:
        hf_model.generation_config.save_pretrained(folder)


def _name_tokenizer_class_for_v4(folder: str) -> None:
    """tokenizer_config.json names ``PreTrainedTokenizerFast`` where transformers 5 wrote
    ``TokenizersBackend`` (its generic tokenizer, a class transformers 4 does not have and refuses
    to load): transformers 5 has the old name for the same class, so both read the folder, with
    the same ids."""
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def v4_config_keys(config: dict) -> dict:
    """The keys transformers 4 reads where 5 writes others: ``torch_dtype`` for ``dtype``, and from
    ``rope_parameters`` the top-level ``rope_theta``, ``partial_rotary_factor`` and (a rope type
    other than the default) ``rope_scaling`` (Phi-3's longrope as the three keys its config
    accepts: the original context and attention factor it takes from the top-level keys); of a model with a rope per attention type (gemma3),
    the full attention's as those and the sliding attention's base as ``rope_local_base_freq``.
    Without them transformers 4 (the engines that pin it) reads the default base, 10,000: a qwen
    model's 1,000,000 or llama 3's 500,000 silently lost, and every answer wrong. Transformers 5
    reads ``rope_parameters`` first and gives the same model either way."""
    out = {}
    if "dtype" in config:
        out["torch_dtype"] = config["dtype"]
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return out
    full, local = rope, None
    if isinstance(rope.get("full_attention"), dict):
        full, local = rope["full_attention"], rope.get("sliding_attention")
    if "rope_theta" in full:
        out["rope_theta"] = full["rope_theta"]
    if "partial_rotary_factor" in full:
        out["partial_rotary_factor"] = full["partial_rotary_factor"]
    if full.get("rope_type") == "longrope":  # transformers 4's Phi-3 takes these three keys and no other
        out["rope_scaling"] = {"type": "longrope", "long_factor": full.get("long_factor"),
                               "short_factor": full.get("short_factor")}
    elif full.get("rope_type", "default") != "default":
        out["rope_scaling"] = {k: v for k, v in full.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if isinstance(local, dict) and "rope_theta" in local:
        out["rope_local_base_freq"] = local["rope_theta"]
    return out


def _write_weights(torch, conv, layout: Layout, folder: str, backend: str, index: int, limit: int,
                   progress, check=lambda: None) -> None:
    """The shards: headers first, then the weights by batches of at most ``limit / 2`` bytes, each
    dequantized and transformed on this thread and written at its offsets while the next batch
    expands: from a GPU through the ring of pinned buffers (``export_ring``), on the host by a
    writer thread, at most ``limit`` bytes of weights on the host at a time. ``check()`` runs
    before each batch: what fails beside the weights (the tokenizer) ends the export there."""
    fds = {}
    try:
        for file, head in layout.headers.items():
            fds[file] = fd = os.open(os.path.join(folder, file), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.ftruncate(fd, layout.sizes[file])
            _pwrite(fd, head, 0, file, "(header)")
        opts = {"profile": False, "read": "preadv"}  # preadv: the file's pages never count in this process's memory
        if backend == "host":
            _return_freed_memory()
            _write_on_host(torch, conv, layout, fds, limit, progress, opts, check)
        else:
            _write_from_device(torch, conv, layout, fds, backend, index, limit, progress, opts, check)
        for fd in fds.values():
            os.fsync(fd)  # the export is on the disk when it returns, as its timing says
    finally:
        for fd in fds.values():
            os.close(fd)


def _write_from_device(torch, conv, layout: Layout, fds: dict, backend: str, index: int, limit: int, progress,
                       opts: dict, check=lambda: None) -> None:
    """Each batch stays on the device; its bytes leave through the ring (``RING_BUFFERS`` pinned
    buffers of ``ring_buffer_bytes(limit)``) to ``RING_WRITERS`` writer threads. A batch's device
    memory is freed once its last copy is done, so at most two batches (``limit``) are on the device
    beside the load's own scratch, and the ring is all the host holds."""
    total = sum(e.nbytes for e in layout.entries)
    buffers = pinned_buffers(torch, RING_BUFFERS, ring_buffer_bytes(limit))
    copier = DeviceToHost(torch, torch.device("cuda", index))
    with Ring(buffers, copier, _pwrite, progress=progress, total=total) as ring:
        for batch in batches(layout.entries, max(1, limit // 2)):
            check()
            tensors = _batch(torch, conv, batch, backend, index, opts)
            ring.begin()
            for e in batch:
                ring.put(tensors.pop(e.name).reshape(-1).view(torch.uint8), fds[e.file], e.offset, e.file, e.name)


def _write_on_host(torch, conv, layout: Layout, fds: dict, limit: int, progress, opts: dict,
                   check=lambda: None) -> None:
    """Each batch loaded on the host backend and handed to one writer thread, at most ``limit``
    bytes of weights waiting at once (``_Budget``)."""
    budget = _Budget(limit)
    total = sum(e.nbytes for e in layout.entries)
    done = [0]
    failed: list[BaseException] = []

    def write(batch: list[Entry], host: dict, nbytes: int) -> None:
        try:
            for e in batch:
                t = host.pop(e.name)
                _pwrite(fds[e.file], t.reshape(-1).view(torch.uint8).numpy(), e.offset, e.file, e.name)
                done[0] += e.nbytes
                if progress is not None:
                    progress(done[0], total, e.name)
        except BaseException as exc:
            failed.append(exc)
            raise
        finally:
            budget.give(nbytes)

    with ThreadPoolExecutor(1, thread_name_prefix="gguf-lab-export") as writer:
        futures = []
        for batch in batches(layout.entries, max(1, limit // 2)):
            check()
            nbytes = sum(e.nbytes for e in batch)
            budget.take(nbytes)
            if failed:
                budget.give(nbytes)
                break
            try:
                host = _batch(torch, conv, batch, "host", 0, opts)
            except BaseException:
                budget.give(nbytes)
                raise
            futures.append(writer.submit(write, batch, host, nbytes))
        for f in futures:
            f.result()


def _batch(torch, conv, batch: list[Entry], backend: str, index: int, opts: dict) -> dict:
    """One batch loaded and transformed: transformers name -> contiguous tensor, on the device that
    loaded it (a GPU, or the host)."""
    from .loader import load

    names = [e.gguf for e in batch]
    r = load(conv.model, dtype=conv.dtype, tensors=names, backend=backend, device=index, **opts)
    sd = conv.state_dict(r, backend, index, opts, names=names)
    out = {}
    for e in batch:
        t = sd.pop(e.name)
        if tuple(t.shape) != e.shape or t.numel() * t.element_size() != e.nbytes:
            raise GGUFLabError(f"{conv.model.path}: tensor {e.gguf!r} came out {tuple(t.shape)} {t.dtype}, the "
                               f"model expects {e.name} {e.shape} ({e.nbytes} bytes)")
        out[e.name] = t.contiguous()
    return out


@functools.cache
def _return_freed_memory() -> bool:
    """glibc keeps a freed block below its mmap threshold in its arenas, and the threshold rises (up
    to 32 MiB) each time a larger mmapped block is freed, so the batches' arrays would stay in the
    process's memory after they are written. A fixed threshold of 1 MiB (which also stops the
    rise) maps every such array on its own and unmaps it when freed. Process-wide, once, and on
    glibc only; True when it was set."""
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return False
        return ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 20) == 1
    except (ValueError, OSError, AttributeError):  # no such confstr name, no libc.so.6, no mallopt
        return False


_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # huggingface_hub's shard names


# the files that make a Hugging Face model folder's model (besides its shards): what an export
# writes, or an earlier one (or transformers' save_pretrained) may have left for another model
MODEL_FILES = frozenset({"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                         "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                         "tokenizer.model", "vocab.json", "merges.txt", WEIGHTS_NAME, INDEX_NAME})


def _old_model_files(out_dir: str) -> set[str]:
    """The files of an earlier export (or model) in ``out_dir``: huggingface_hub's shard names
    (``model-00001-of-00003.safetensors``) and ``MODEL_FILES``; a user's other files (a README,
    an adapter) are never among them."""
    return {n for n in os.listdir(out_dir) if _SHARD_RE.fullmatch(n) or n in MODEL_FILES}


def _move_into_place(tmp: str, out_dir: str, layout: Layout, overwrite: bool) -> None:
    """The finished folder in place. Without ``overwrite``, one rename, which fails if ``out_dir``
    holds anything by now (a folder filled, or another export finished, while this one ran): an
    error, nothing of theirs touched. With it, in a non-empty ``out_dir``: the old index goes first
    (the folder stops looking complete), then the new files, the model files of an earlier export
    that this one does not write (shards, a chat template, ...: ``MODEL_FILES``) are removed, and
    the index (or the single shard) comes last."""
    if not overwrite or not os.path.isdir(out_dir) or not os.listdir(out_dir):
        try:
            os.rename(tmp, out_dir)  # over a missing or empty folder only, at once
            return
        except OSError as e:
            if e.errno == errno.ENOTDIR:
                raise OutputExistsError(f"{out_dir}: a file (not a folder) appeared there while the export ran; "
                                        "nothing was written there") from None
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            if not overwrite:
                raise OutputExistsError(f"{out_dir}: the folder was filled while the export ran "
                                        f"({e.strerror}); nothing was written there; export again into a new "
                                        "or empty folder, or pass overwrite=True (--overwrite)") from None
    stale = _old_model_files(out_dir) - set(os.listdir(tmp))
    for old in (INDEX_NAME, WEIGHTS_NAME):
        if os.path.isfile(os.path.join(out_dir, old)):
            os.remove(os.path.join(out_dir, old))
    last = INDEX_NAME if layout.index is not None else WEIGHTS_NAME
    for name in os.listdir(tmp):
        if name != last:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    for name in stale:
        with contextlib.suppress(FileNotFoundError):  # gone already: nothing to remove
            os.remove(os.path.join(out_dir, name))
    os.replace(os.path.join(tmp, last), os.path.join(out_dir, last))
    os.rmdir(tmp)
