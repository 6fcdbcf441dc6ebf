"""From a GGUF file to a running transformers model: the config built by transformers' own GGUF
tables from this project's header parser, the model built on the meta device (no weights allocated),
the weights from ``load()`` (dequantized on the GPU, handed to torch through DLPack without a copy;
NumPy arrays on the host backend), renamed by transformers' own GGUF name map and transformed by
transformers' own ``TensorProcessor`` classes, on the device.

    model = from_gguf("model.gguf", dtype="float16", device="cuda")
    sd = to_state_dict("model.gguf", device="cpu")     # transformers' names -> torch tensors
    tok = tokenizer("model.gguf")                      # transformers' tokenizer (hf_tokenizer.py)
    export("model.gguf", "model-hf")                   # a safetensors folder (export.py)

Needs the ``hf`` extra (torch, transformers, accelerate). Bit-exactness: transformers dequantizes
to float32, transforms, then casts; here every tensor is loaded in the target dtype (the loader
rounds as that cast does) and transformed there, which gives the same bits for a reordering (for
every supported architecture, transformers' processors only reorder 2-D tensors); a 1-D tensor
whose values the processor changes (Gemma's norms) is loaded again in float32, changed there and
cast, as transformers does. The tests check every tensor bit for bit.
"""

from __future__ import annotations

import time
from typing import Any

from .errors import GGUFLabError
from .export import export as _export
from .hf_convert import (
    _DTYPES, SUPPORTED_ARCHITECTURES, _Conversion, _deps, _device, _finish, _load_target, _result_device, architecture,
    config, config_dict, weights_map)
from .hf_tokenizer import tokenizer as _tokenizer
from .hf_tp import from_gguf_tp
from .loader import LoadResult
from .loader.background import load_while
from .model import GGUFModel, shared_model

# The order of a first call: False (the default) imports torch, transformers and the file's model
# class first, then starts the load and builds the model while it runs; True starts the load
# first and imports beside it (the imports, pure Python, then run slower beside the load's threads:
# on the H200 the first call took 4.6 s more than the imports alone that way; BENCHMARKS.md).
LOAD_DURING_IMPORTS = False

__all__ = ["SUPPORTED_ARCHITECTURES", "LOAD_DURING_IMPORTS", "architecture", "config", "config_dict", "weights_map", "to_state_dict",
           "from_gguf", "tokenizer", "export"]


def to_state_dict(path_or_result, dtype: str = "float16", device="cuda", **load_options) -> dict[str, Any]:
    """The weights of a GGUF file under transformers' parameter names, as torch tensors on
    ``device``, equal to what ``from_pretrained(..., gguf_file=...)`` puts in the model.

    Args:
        path_or_result: a path, an open ``GGUFModel``, or a ``LoadResult`` of the file (not of the
            raw mode): its dtype and device are used, and its arrays become the state dict's
            tensors, the ones transformers reorders (llama's q and k) reordered in place.
        dtype: "float16", "bfloat16" or "float32".
        device: "cuda", "cuda:N" (loaded with the ``gpu`` mode through CuPy) or "cpu" (the
            host backend).
        load_options: passed to ``load`` (streams, chunk_mb, readers, progress, profile, ...).

    Example:
        >>> sd = to_state_dict("model.gguf", device="cpu")
        >>> sd["model.layers.0.self_attn.q_proj.weight"].shape
        torch.Size([256, 256])
    """
    result = None
    if isinstance(path_or_result, LoadResult):
        result = path_or_result
        if result.path is None:
            raise GGUFLabError("this LoadResult does not name its file; pass the path instead")
        if result.options.mode == "raw":
            raise GGUFLabError("a LoadResult of the raw mode holds quantized bytes; load with mode='gpu' or 'cpu'")
        dtype = result.options.dtype
        device = "cpu" if result.backend == "host" else f"cuda:{_result_device(result)}"
        path_or_result = result.path
    model = path_or_result if isinstance(path_or_result, GGUFModel) else shared_model(path_or_result)
    if result is not None:
        dev, backend, index = _device(device)
        conv = _Conversion(model, dtype)
    else:
        conv, result, backend, index = _build_while_loading(model, dtype, device, None, load_options)
    return conv.state_dict(result, backend, index, load_options)


def _import_classes(model: GGUFModel) -> None:
    """Import torch, transformers, its GGUF tables and the file's model class (seconds in a fresh
    process): the modules the build needs, so that the load then runs beside the build alone."""
    import importlib

    _deps()
    importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[config_dict(model)["model_type"]]]  # imports its module
    except KeyError:  # no causal-LM class: the build says so
        pass


def _build_while_loading(model: GGUFModel, dtype: str, device, attn_implementation, load_options: dict):
    """Import torch, transformers and the model's class (``_import_classes``; with
    ``LOAD_DURING_IMPORTS`` after the load has started, beside it), then start the load of every
    tensor of the file on a thread of its own and build the model on the meta device while it
    runs; the tensors the model does not take are dropped after. A failing build (or an
    interrupt) cancels the load and frees what it loaded. Returns (conversion, load result,
    backend, device index)."""
    if dtype not in _DTYPES:
        raise GGUFLabError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    architecture(model)  # an unsupported file is refused before any load
    imports_s = None
    if not LOAD_DURING_IMPORTS:
        t0 = time.perf_counter()
        _import_classes(model)
        imports_s = time.perf_counter() - t0
    backend, index = _load_target(device)
    conv, result, load_s, wait_s = load_while(  # _device imports torch: is the GPU torch's too?
        model, dict(load_options, dtype=dtype, backend=backend, device=index),
        lambda: (_device(device), _Conversion(model, dtype, attn_implementation))[1])
    conv.steps.update(load_s=load_s, load_wait_s=wait_s)
    if imports_s is not None:
        conv.steps["imports_s"] = imports_s
    return conv, conv.wanted_only(result), backend, index


def from_gguf(path, dtype: str = "float16", device="cuda", *, attn_implementation: str | None = None,
              tp_plan: str | None = None, device_mesh=None, timeout_s: float = 600.0, **load_options):
    """A ready transformers model (``AutoModelForCausalLM``, eval mode) from a GGUF file: the same
    config and weights as ``from_pretrained(dir, gguf_file=name, dtype=..., device_map=device)``.

    The model is built on the meta device and its parameters are the loaded tensors themselves
    (``load_state_dict(assign=True)``): no weight is allocated twice. ``model.gguf_load_result``
    is the ``LoadResult`` (``.profile`` for ``plots.timeline``); ``model.gguf_steps_s`` the seconds
    of each step (imports, config, meta_model, names, load, load_wait, transform, assign, total).
    torch, transformers and the model's class are imported first (``imports_s``: seconds in a
    fresh process, next to nothing after); then the load starts on a thread of its own and the
    model is built while it runs (``load_s`` overlaps the steps between; ``load_wait_s`` is what
    was left to wait for). ``hf.LOAD_DURING_IMPORTS = True`` starts the load before the imports.

    Args:
        path: a .gguf file (or an open ``GGUFModel``) of a supported architecture
            (``SUPPORTED_ARCHITECTURES``).
        dtype: "float16", "bfloat16" or "float32".
        device: "cuda", "cuda:N" or "cpu" (the host backend: NumPy dequantization on all cores).
        attn_implementation: passed to transformers ("sdpa", "eager", ...; default its own choice).
        tp_plan: "auto" under ``torchrun``: tensor parallel, the model ``from_pretrained(...,
            tp_plan="auto")`` builds (DTensor parameters, transformers' own plan), each rank reading
            only its shards of the file (``gguf_gpu_lab.hf_tp``); ``device="cuda"`` is then each
            rank's ``cuda:LOCAL_RANK`` (NCCL), ``"cpu"`` the host backend (gloo).
        device_mesh: with ``tp_plan``, a ``DeviceMesh`` (1-D, or with a "tp" dimension) to shard
            over; default transformers' own mesh of the whole world.
        timeout_s: with ``tp_plan``, how long (1 to 86400 s) a collective waits for the other
            ranks when this call sets up ``torch.distributed``.
        load_options: passed to ``load`` (streams, chunk_mb, readers, progress, profile, ...).

    Example:
        >>> import torch
        >>> model = from_gguf("model.gguf", device="cpu")        # device="cuda": dequantized on the GPU
        >>> model(torch.tensor([[1, 2, 3]])).logits.shape
        torch.Size([1, 3, 4096])
    """
    if tp_plan is not None:
        if tp_plan != "auto":
            raise GGUFLabError(f"tp_plan must be None or 'auto' (transformers' own plan), got {tp_plan!r}")
        return from_gguf_tp(path, dtype, device, attn_implementation, device_mesh, timeout_s, load_options)
    if device_mesh is not None:
        raise GGUFLabError("device_mesh shards a model with tp_plan='auto'; pass both")
    t0 = time.perf_counter()
    model = path if isinstance(path, GGUFModel) else shared_model(path)
    conv, result, backend, index = _build_while_loading(model, dtype, device, attn_implementation, load_options)
    dev = _device(device)[0]
    state = conv.state_dict(result, backend, index, load_options)
    t1 = time.perf_counter()
    hf = conv.hf_model
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    tied = getattr(hf, "all_tied_weights_keys", {}) if conv.config.tie_word_embeddings else {}
    hf.tie_weights(missing_keys=set(missing), recompute_mapping=False)
    untied = [k for k in missing if k not in tied]
    if unexpected or untied:
        raise GGUFLabError(f"{model.path}: the weights do not fit {type(hf).__name__}: "
                           f"missing {untied[:3]}, unexpected {list(unexpected)[:3]}")
    _finish(hf, dev)
    steps = {**conv.steps, "assign_s": time.perf_counter() - t1}
    steps["total_s"] = time.perf_counter() - t0
    hf.gguf_load_result = result
    hf.gguf_steps_s = steps
    return hf


def tokenizer(path):
    """transformers' tokenizer for a GGUF file: what ``AutoTokenizer.from_pretrained(folder,
    gguf_file=name)`` gives, read by this project's parser (``gguf_gpu_lab.hf_tokenizer``)."""
    return _tokenizer(path)


def export(path, out_dir, dtype: str = "bfloat16", max_shard_size="5GB", overwrite: bool = False, progress=True,
           **options):
    """A Hugging Face model folder (safetensors) from a GGUF file: see ``gguf_gpu_lab.export.export``."""
    return _export(path, out_dir, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                   progress=progress, **options)
