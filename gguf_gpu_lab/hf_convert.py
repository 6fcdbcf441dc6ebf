"""The transformers side of a GGUF file, under ``hf`` and the modules above it (``hf_tp``,
``hf_tokenizer``, ``export``): the config from transformers' own GGUF tables over this project's
parser, transformers' names for the file's tensors, the device a load goes to, and the conversion
of loaded tensors (transformers' own ``TensorProcessor`` transforms, on the device). ``hf`` is the
face; see its docstring for bit-exactness.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import sys
import threading
import time
from typing import Any

import numpy as np

from .errors import GGUFLabError, warn
from .loader import DeviceTensor, LoadResult, load
from .model import GGUFModel, shared_model

# the architectures checked equal to transformers' own load, tensor for tensor (tests/test_hf.py);
# "mistral" is a llama file named exactly "mistral", which transformers reads as a Mistral model
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")

_DTYPES = ("float16", "bfloat16", "float32")


def _deps():
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        raise GGUFLabError(f"gguf_gpu_lab.hf needs torch and transformers ({e}); "
                           "install them with: pip install 'gguf-gpu-lab[hf]'") from None
    return torch


def architecture(model: GGUFModel) -> tuple[str, str]:
    """(the file's ``general.architecture``, the one transformers reads it as), or a
    ``GGUFLabError`` naming an architecture that is not supported here."""
    md = model.metadata
    arch = md.get("general.architecture")
    # transformers' own rule: a llama file whose name is exactly "mistral" is a Mistral model
    updated = "mistral" if arch is not None and "llama" in arch and md.get("general.name") == "mistral" else arch
    if updated not in SUPPORTED_ARCHITECTURES:
        raise GGUFLabError(f"{model.path}: architecture {updated!r} is not supported by gguf_gpu_lab.hf; "
                           f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch, updated


def _value(model: GGUFModel, key: str) -> Any:
    """A metadata value as transformers' GGUF reader gives it: a one-element array as its element."""
    v = model.metadata[key]
    if isinstance(v, dict) or isinstance(v, list):
        v = model.metadata_value(key)
        v = v.tolist() if isinstance(v, np.ndarray) else list(v)
        if len(v) == 1:
            v = v[0]
    return v


def config_dict(model: GGUFModel) -> dict[str, Any]:
    """The transformers config dict of a GGUF file: transformers' GGUF key table
    (``GGUF_CONFIG_MAPPING``) and defaults applied to metadata read by this project's parser
    (string arrays stay undecoded), with the rules ``load_gguf_checkpoint`` adds for the
    supported architectures (tied embeddings, Gemma 3's text model, the vocabulary size)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    arch, updated = architecture(model)
    cfg: dict[str, Any] = {}
    for key in model.metadata:
        prefix, _, rest = key.replace(arch, updated).partition(".")
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if renamed is None or renamed == -1:
            continue
        value = _value(model, key)
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, updated)
        cfg[renamed] = value
    cfg["tie_word_embeddings"] = "output.weight" not in model
    for k, v in GGUF_CONFIG_DEFAULTS_MAPPING.get(updated, GGUF_CONFIG_DEFAULTS_MAPPING.get(arch) or {}).items():
        cfg.setdefault(k, v)
    if cfg.get("model_type") == "gemma3":  # the file holds the text backbone only
        cfg["model_type"] = "gemma3_text"
    if "vocab_size" not in cfg and "tokenizer.ggml.tokens" in model.metadata:
        tokens = model.metadata["tokenizer.ggml.tokens"]
        cfg["vocab_size"] = tokens["length"] if isinstance(tokens, dict) else len(tokens)
    cfg.update(llama_cpp_config(model))
    return cfg


# block counts llama.cpp takes for the 27B models, whose query scale is not the head size
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def llama_cpp_config(model: GGUFModel) -> dict[str, Any]:
    """Where this project's config departs from transformers' GGUF config, to be the model llama.cpp
    runs:

    - the rope scaling a file holds (``rope_scaling``, see ``rope_scaling``), which transformers
      reads for no supported architecture: without it every position past the original context is
      rotated as if unscaled;
    - Gemma 2 and 3 scale queries by ``query_pre_attn_scalar ** -0.5``, a value no GGUF key holds,
      which transformers leaves at its default, 256. llama.cpp takes the width over the heads for
      the 27B models (144 and 168, as their own configs say) and the head size (``key_length``)
      otherwise: so does this. With 256 a 27B model's attention scores come out 0.75 and 0.81 times
      what they are."""
    arch, _ = architecture(model)
    out: dict[str, Any] = {}
    scaling = rope_scaling(model)
    if scaling is not None:
        extra = scaling.pop("_config", {})
        out.update(extra, rope_scaling=scaling)
    if arch not in _GEMMA_27B_LAYERS:
        return out
    meta = model.metadata
    width, heads = meta.get(f"{arch}.embedding_length"), meta.get(f"{arch}.attention.head_count")
    if not (isinstance(width, int) and isinstance(heads, int) and heads > 0):
        return out  # transformers' config refuses such a file with its own message
    if meta.get(f"{arch}.block_count") == _GEMMA_27B_LAYERS[arch]:
        return {**out, "query_pre_attn_scalar": width // heads}
    head = _head_size(model, arch)
    return {**out, "query_pre_attn_scalar": head} if head else out


# Llama 3's original context, where a file's rope_freqs does not say it: only the ratios of it to
# the low and high frequency factors shape the rotation, so any value gives the same model
_LLAMA3_CONTEXT = 8192


def rope_scaling(model: GGUFModel) -> dict[str, Any] | None:
    """The rope scaling of a file as transformers' ``rope_scaling`` (None: none), from what
    llama.cpp applies:

    - ``{arch}.rope.scaling.type`` "linear" (or the older ``rope.scale_linear``) and "yarn", with
      ``.factor`` and ``.original_context_length`` (Gemma 3 4B and up, Qwen2.5's long variants);
    - a ``rope_freqs.weight`` tensor (Llama 3.1 and later): per-frequency divisors, which are
      Llama 3's scaling; its factor, low and high frequency factors are recovered from them and
      checked by computing the divisors back (a shape it cannot be is a warning, and no scaling);
    - Phi-3's ``rope_factors_long`` and ``rope_factors_short`` tensors: "longrope", with the
      original context as ``original_max_position_embeddings`` (under ``"_config"``: a config key
      of its own, beside ``rope_scaling``).
    """
    arch = model.metadata.get("general.architecture")
    meta = model.metadata
    key = lambda k: meta.get(f"{arch}.rope.scaling.{k}")  # noqa: E731
    if "rope_freqs.weight" in model:
        return _llama3_scaling(model, arch)
    if "rope_factors_long.weight" in model and "rope_factors_short.weight" in model:
        orig, rotary = key("original_context_length"), _rotary_dims(model, arch)
        long = model.dequantize("rope_factors_long.weight").ravel().tolist()
        short = model.dequantize("rope_factors_short.weight").ravel().tolist()
        if rotary is None or len(long) != rotary[0] // 2 or len(short) != rotary[0] // 2:
            warn(f"{model.path}: rope_factors_long/short.weight have {len(long)} and {len(short)} entries, not "
                 f"half the rotated dimensions ({rotary and rotary[0]}); the model rotates positions unscaled, "
                 "which is wrong past its original context")
            return None
        out: dict[str, Any] = {"rope_type": "longrope", "long_factor": long, "short_factor": short, "_config": {}}
        if isinstance(key("attn_factor"), (int, float)):
            out["attention_factor"] = float(key("attn_factor"))
        if isinstance(orig, int):
            out["_config"]["original_max_position_embeddings"] = orig
        if rotary[0] != rotary[1]:  # Phi-4-mini rotates 96 of 128: transformers' config says all
            out["_config"]["partial_rotary_factor"] = rotary[0] / rotary[1]
        return out
    kind, factor = key("type"), key("factor")
    if kind is None and isinstance(meta.get(f"{arch}.rope.scale_linear"), (int, float)):
        kind, factor = "linear", meta[f"{arch}.rope.scale_linear"]
    if kind in (None, "none") or not isinstance(factor, (int, float)) or factor == 1:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn" and isinstance(key("original_context_length"), int):
        return {"rope_type": "yarn", "factor": float(factor),
                "original_max_position_embeddings": key("original_context_length")}
    warn(f"{model.path}: rope scaling {kind!r} (factor {factor}) is not one gguf_gpu_lab.hf can give transformers; "
         "the model rotates positions unscaled, which is wrong past its original context")
    return None


def _head_size(model: GGUFModel, arch: str) -> int | None:
    """A head's size: ``attention.key_length`` where the file has it, else the width over the
    heads; None where the file gives neither."""
    meta = model.metadata
    head = meta.get(f"{arch}.attention.key_length")
    if isinstance(head, int):
        return head if head > 0 else None
    width, heads = meta.get(f"{arch}.embedding_length"), meta.get(f"{arch}.attention.head_count")
    return width // heads if isinstance(width, int) and isinstance(heads, int) and heads > 0 else None


def _rotary_dims(model: GGUFModel, arch: str) -> tuple[int, int] | None:
    """(the dimensions of a head the rotation turns, the head's): ``rope.dimension_count`` where
    the file has it, else the whole head; None where the file gives no head size."""
    head = _head_size(model, arch)
    rotary = model.metadata.get(f"{arch}.rope.dimension_count", head)
    return (rotary, head) if head and isinstance(rotary, int) and 0 < rotary <= head else None


def _llama3_scaling(model: GGUFModel, arch: str) -> dict[str, Any] | None:
    """Llama 3's rope scaling from ``rope_freqs.weight``: llama.cpp divides frequency i of the
    rotation, ``base ** (-2i / d)``, by its factor f_i: 1 for wavelengths under the original
    context over ``high_freq_factor``, ``factor`` over the context over ``low_freq_factor``, and
    ``1 / ((1 - s) / factor + s)`` between, s linear in 1 / wavelength. The line through those
    points gives the two ratios; the context is the file's, else Llama 3's."""
    meta = model.metadata
    f = model.dequantize("rope_freqs.weight").astype(np.float64).ravel()
    base = meta.get(f"{arch}.rope.freq_base", 10000.0)
    n = len(f)
    wavelen = 2 * np.pi / base ** (-np.arange(0, 2 * n, 2, dtype=np.float64) / (2 * n))
    factor = float(f.max())
    if np.allclose(f, 1.0):
        return None
    mid = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    context = meta.get(f"{arch}.rope.scaling.original_context_length", _LLAMA3_CONTEXT)
    rotary = _rotary_dims(model, arch)
    out = None
    # one entry for each pair of rotated dimensions (llama.cpp refuses another length), and at least
    # two between the ends, which set the line
    if rotary is not None and 2 * n == rotary[0] and mid.sum() >= 2 and factor > 1 and isinstance(context, int):
        smooth = (factor / f[mid] - 1) / (factor - 1)   # s = a / wavelen + b
        a, b = np.polyfit(1 / wavelen[mid], smooth, 1)
        if a > 0:
            # (to 6 digits: the divisors are float32, and Llama 3's own factors are round numbers)
            low = float(f"{-b * context / a:.6g}")
            high = float(f"{-b * context / a + context / a:.6g}")
            out = {"rope_type": "llama3", "factor": float(f"{factor:.6g}"), "low_freq_factor": low,
                   "high_freq_factor": high, "original_max_position_embeddings": context}
            if not np.allclose(_llama3_divisors(wavelen, out), f, rtol=1e-4, atol=0):
                out = None
    if out is None:
        warn(f"{model.path}: rope_freqs.weight ({n} factors, {f.min():.4g} to {factor:.4g}, for "
             f"{rotary and rotary[0]} rotated dimensions) is not Llama 3's rope scaling as this can recover it; "
             "the model rotates positions unscaled, which is wrong past its original context")
    return out


def _llama3_divisors(wavelen: np.ndarray, p: dict) -> np.ndarray:
    """llama.cpp's rope_freqs (as its converter writes them) for Llama 3's scaling ``p``."""
    ctx, factor = p["original_max_position_embeddings"], p["factor"]
    lo, hi = p["low_freq_factor"], p["high_freq_factor"]
    smooth = (ctx / wavelen - lo) / (hi - lo)
    return np.where(wavelen < ctx / hi, 1.0,
                    np.where(wavelen > ctx / lo, factor, 1 / ((1 - smooth) / factor + smooth)))


def config(path_or_model):
    """The ``transformers`` config of a GGUF file (see ``config_dict``)."""
    _deps()
    from transformers import CONFIG_MAPPING

    model = path_or_model if isinstance(path_or_model, GGUFModel) else shared_model(path_or_model)
    d = config_dict(model)
    return CONFIG_MAPPING[d["model_type"]].from_dict(d)


# -- the name map -------------------------------------------------------------------------------

_NAME_MAP_LOCK = threading.Lock()
_NAME_MAPS: dict[tuple, dict[str, str]] = {}


@contextlib.contextmanager
def _gguf_name_maps_memoized():
    """transformers' ``get_gguf_hf_weights_map`` builds gguf-py's name table again for every module
    it recurses into: 11-12 s for an 8B llama against 0.05 s with the table built once (the 2-core
    development machine, 2026-11-28). Memoized for the call only; the results are the same."""
    import gguf

    real = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(real)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = real


def weights_map(hf_model, processor, arch: str) -> dict[str, str]:
    """GGUF tensor name -> transformers parameter name, by transformers' ``get_gguf_hf_weights_map``
    for the file's architecture (cached by the model's parameter names)."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    key = (type(processor).__name__, arch, hf_model.config.num_hidden_layers, tuple(hf_model.state_dict()))
    with _NAME_MAP_LOCK:
        if key not in _NAME_MAPS:
            with _gguf_name_maps_memoized():
                _NAME_MAPS[key] = get_gguf_hf_weights_map(hf_model, processor, model_type=arch)
            while len(_NAME_MAPS) > 8:
                _NAME_MAPS.pop(next(iter(_NAME_MAPS)))
        return _NAME_MAPS[key]


# -- state dict -----------------------------------------------------------------------------------

def _parse_device(device) -> tuple[str, int | None]:
    """("cpu" or "cuda", index or None) of "cuda", "cuda:1", "cpu", an index or a torch.device,
    without importing torch: a load can start before torch is imported."""
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", device.strip()) if isinstance(device, str) else None
    if m is not None:
        return m.group(1), None if m.group(2) is None else int(m.group(2))
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return "cuda", device
    if type(device).__name__ == "device" and getattr(device, "type", None) in ("cpu", "cuda"):
        return device.type, device.index
    raise GGUFLabError(f"device must be 'cuda', 'cuda:N' or 'cpu', got {device!r}")


def _load_target(device) -> tuple[str, int]:
    """(backend, device index) a load for ``device`` uses, without importing torch: "cuda" alone
    is torch's current device, which is 0 until torch has set up CUDA."""
    kind, index = _parse_device(device)
    if kind == "cpu":
        return "host", 0
    if index is None:
        torch = sys.modules.get("torch")
        index = torch.cuda.current_device() if torch is not None and torch.cuda.is_initialized() else 0
    return "cupy", index


def _device(device) -> tuple[Any, str, int]:
    """(torch.device, backend, device index) for a device given as "cuda", "cuda:1", "cpu" or a torch.device."""
    torch = _deps()
    kind, index = _parse_device(device)
    if kind == "cpu":
        return torch.device("cpu"), "host", 0
    if not torch.cuda.is_available():
        raise GGUFLabError(f"device {device!r}: torch sees no GPU here; device='cpu' loads on the host backend")
    index = index if index is not None else torch.cuda.current_device()
    return torch.device("cuda", index), "cupy", index


def _as_torch(dt: DeviceTensor):
    """The loaded array as a torch tensor sharing its memory: ``torch.from_numpy`` on the host,
    DLPack on a GPU."""
    torch = _deps()
    if isinstance(dt.array, np.ndarray):
        t = torch.from_numpy(dt.array)
        return t.view(torch.bfloat16) if dt.dtype == "bfloat16" else t
    return dt.to_torch()


STOP_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
# the end-of-turn texts llama.cpp also ends generation at, whatever the file's keys say (from
# llama-vocab.cpp's end-of-generation list, which also holds the fill-in-the-middle pad and
# separators of code models, left out here): most chat files name no eot token, and their turns
# end with one of these
STOP_TEXTS = frozenset({"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>",
                        "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>", "_<EOT>",
                        "<end_of_utterance>"})


def stop_ids(model: GGUFModel, eos, vocab: int | None) -> list[int]:
    """The tokens a chat's generation ends at, as llama.cpp ends it: ``eos`` (an id, a list or None, as the
    config has it), then the file's end-of-turn and end-of-message tokens (``STOP_KEYS``), then the
    tokens whose text is in ``STOP_TEXTS`` (Gemma's ``<end_of_turn>``, ChatML's ``<|im_end|>``,
    Phi-3's ``<|end|>``, Llama 3's ``<|eot_id|>``); each once, ids outside ``vocab`` left out.
    transformers' own GGUF loading reads only the eos id, so a chat model served from its folder
    would run past the end of its turn."""
    ids = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def add(v) -> None:
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0 and (vocab is None or v < vocab) and v not in ids:
            ids.append(v)

    for key in STOP_KEYS:
        add(model.metadata.get(key))
    if "tokenizer.ggml.tokens" in model.metadata:
        # (a token that is not UTF-8 is replaced, not a reason to stop nowhere: the tokenizer reports it)
        tokens = model.metadata_value("tokenizer.ggml.tokens", errors="replace")
        for i, text in enumerate(tokens):
            if text in STOP_TEXTS:
                add(i)
    return ids


class _Conversion:
    """What turning one file into transformers' tensors needs: config, meta model, processor, names."""

    def __init__(self, model: GGUFModel, dtype: str, attn_implementation: str | None = None):
        torch = _deps()
        from transformers import CONFIG_MAPPING, AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        if dtype not in _DTYPES:
            raise GGUFLabError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        self.steps: dict[str, float] = {}
        t0 = time.perf_counter()
        self.model, self.dtype, self.torch_dtype = model, dtype, getattr(torch, dtype)
        self.arch, self.updated = architecture(model)
        self.config_dict = config_dict(model)
        try:
            self.config = CONFIG_MAPPING[self.config_dict["model_type"]].from_dict(self.config_dict)
        except Exception as e:  # heads that do not divide the width, say (huggingface_hub's validation errors)
            raise GGUFLabError(f"{model.path}: transformers refuses the file's config: "
                               f"{' '.join(str(e).split()) or type(e).__name__}") from None
        t1 = time.perf_counter()
        kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        with torch.device("meta"):
            self.hf_model = AutoModelForCausalLM.from_config(self.config, dtype=self.torch_dtype, **kw)
        gen = getattr(self.hf_model, "generation_config", None)
        if gen is not None:
            stop = stop_ids(model, gen.eos_token_id, self.config_dict.get("vocab_size"))
            if stop:
                gen.eos_token_id = stop[0] if len(stop) == 1 else stop
        t2 = time.perf_counter()
        self.processor = TENSOR_PROCESSORS.get(self.arch, TensorProcessor)(config=self.config_dict)
        self.names = weights_map(self.hf_model, self.processor, self.arch)
        t3 = time.perf_counter()
        self.steps.update(config_s=t1 - t0, meta_model_s=t2 - t1, names_s=t3 - t2)
        self.wanted = [t.name for t in model.tensors if t.name in self.names]

    def _process(self, name: str, t):
        try:
            r = self.processor.process(weights=t, name=name, tensor_key_mapping=self.names,
                                       parsed_parameters={"tensors": {}})
        except (RuntimeError, ValueError, IndexError) as e:  # a shape the config's heads do not fit, say
            c = self.config_dict
            heads = {k: c[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim") if k in c}
            raise GGUFLabError(f"{self.model.path}: transformers' {type(self.processor).__name__} cannot transform "
                               f"tensor {name!r} of shape {tuple(t.shape)} with the file's {heads}: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if r.name != name:
            raise GGUFLabError(f"{self.model.path}: transformers' {type(self.processor).__name__} renames or consumes "
                               f"tensor {name!r}; gguf_gpu_lab.hf does not handle that")
        return r.weights

    def wanted_only(self, result: LoadResult) -> LoadResult:
        """``result`` without the tensors transformers' model does not take (loaded because the
        load started before the model named what it takes): their memory goes now."""
        if all(n in self.names for n in result):
            return result
        kept = {n: t for n, t in result.tensors.items() if n in self.names}
        return dataclasses.replace(result, tensors=kept, out_bytes=sum(t.nbytes for t in kept.values()))

    def state_dict(self, result: LoadResult, backend: str, index: int, load_options: dict,
                   names: list[str] | None = None) -> dict[str, Any]:
        """transformers' names -> tensors on the device, the loaded memory reused wherever the
        transform keeps the shape. A 1-D tensor whose values the processor changes (Gemma's norms:
        weight - 1) is loaded again in float32 and changed there, as transformers does, then cast.
        ``names``: these GGUF tensors only (default all the model needs; the export goes by batches)."""
        torch = _deps()
        t0 = time.perf_counter()
        wanted = self.wanted if names is None else names
        missing = [n for n in wanted if n not in result]
        if missing:
            raise GGUFLabError(f"{self.model.path}: the load result lacks {len(missing)} tensors the model needs, "
                               f"first {missing[0]!r}")
        out: dict[str, Any] = {}
        again: list[str] = []
        with torch.no_grad():
            for name in wanted:
                t = _as_torch(result[name])
                w = self._process(name, t)
                if w is not t:
                    if t.ndim == 1 and self.dtype != "float32":
                        again.append(name)
                        continue
                    if w.shape == t.shape:
                        t.copy_(w)  # back into the loaded buffer: the transform's scratch is freed at once
                    else:
                        t = w.contiguous()
                out[self.names[name]] = t
            if again:
                opts = {k: v for k, v in load_options.items() if k != "progress"}
                r32 = load(self.model, dtype="float32", tensors=again, backend=backend, device=index, **opts)
                for name in again:
                    out[self.names[name]] = self._process(name, _as_torch(r32[name])).to(self.torch_dtype)
        self.steps["transform_s"] = time.perf_counter() - t0
        return out


def _result_device(result: LoadResult) -> int:
    for dt in result.values():
        return int(dt.array.device.id)
    return 0


def _finish(hf, dev) -> None:
    """What ``from_pretrained`` does after filling the weights, by transformers' own code: buffers
    that are not weights (rotary frequencies, embedding scales) made on the device and computed by
    ``initialize_weights``, which leaves every loaded parameter as it is; then eval mode."""
    torch = _deps()
    with torch.no_grad():
        for p in hf.parameters():
            if p.is_meta:
                raise GGUFLabError(f"parameter of shape {tuple(p.shape)} was never filled")
            p._is_hf_initialized = True
        for mod in hf.modules():
            for name, buf in list(mod._buffers.items()):
                if buf is not None and buf.is_meta:
                    mod._buffers[name] = torch.empty_like(buf, device=dev)
        hf.initialize_weights()
    hf.eval()
