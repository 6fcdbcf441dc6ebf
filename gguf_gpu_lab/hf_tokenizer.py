"""transformers' tokenizer of a GGUF file, from this project's parser: the dict transformers' own
GGUF tokenizer reading builds (``transformers.integrations.gguf.get_gguf_tokenizer``), made from
``GGUFModel.metadata_value``, handed to transformers' own converter (``convert_gguf_tokenizer``)
through the tokenizer class ``AutoTokenizer`` picks for the file. The same tokenizer comes out,
without transformers' second parse of the header (and, for ``AutoTokenizer``, a third by gguf-py
to build the config) and with the merges a sentencepiece vocabulary implies derived by an exact,
faster copy of transformers' ``generate_merges``.

    tok = tokenizer("model.gguf")     # what AutoTokenizer.from_pretrained(dir, gguf_file=name) gives
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

import numpy as np

from .errors import GGUFLabError
from .model import GGUFModel, shared_model

# transformers.integrations.gguf.gguf_tokenizer_mapping: GGUF_TOKENIZER_MAPPING and _SPECIAL_TOKENS (5.24+)
_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                   "pad_token": "padding_token_id"}

# transformers' conversion is patched for the length of one call (see _fast_conversion): one at a time
_PATCH_LOCK = threading.Lock()


def _plain(model: GGUFModel, key: str) -> Any:
    """A metadata value as transformers' own GGUF reader gives it: arrays as lists of Python values."""
    v = model.metadata[key]
    if isinstance(v, (dict, list)):
        v = model.metadata_value(key)
        v = v.tolist() if isinstance(v, np.ndarray) else list(v)
    elif isinstance(v, np.generic):
        v = v.item()
    return v


def gguf_tokenizer(model: GGUFModel) -> tuple[str, dict, dict]:
    """``(architecture, tokenizer_dict, tokenizer_config)``: what transformers' ``get_gguf_tokenizer``
    returns for the file, read by this project's parser."""
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING

    md = model.metadata
    grouped = {group: {name: _plain(model, f"tokenizer.{key}") for key, name in renames.items()
                       if f"tokenizer.{key}" in md}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tok, cfg = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in tok:
        raise GGUFLabError(f"{model.path}: no tokenizer.ggml.tokens in the metadata: the file carries no tokenizer")
    kind = tok.get("tokenizer_type")
    if kind == "llama":  # transformers' rule: llama.cpp adds BOS to a sentencepiece vocabulary unless told not to
        cfg.setdefault("add_bos_token", True)
    elif kind == "gemma4":
        cfg["add_bos_token"] = False
    n = len(tok["tokens"])
    for name, key in _SPECIAL_TOKENS.items():
        token_id = md.get(f"tokenizer.ggml.{key}")
        if token_id is not None and not 0 <= int(token_id) < n:
            raise GGUFLabError(f"{model.path}: tokenizer.ggml.{key} is {token_id}, outside the vocabulary of {n} tokens")
        cfg[name] = tok["tokens"][int(token_id)] if token_id is not None else None
    return md["general.architecture"], tok, cfg


def generate_merges(vocab: dict, vocab_scores: dict | None = None, skip_tokens=None) -> list[tuple[str, str]]:
    """transformers' ``tokenization_utils_base.generate_merges``: the same list in the same order.

    The original cuts every token at every place and looks both pieces up (two new strings, two
    hashes, per place: most of the conversion's time on a 262,144-token sentencepiece vocabulary).
    Here a polynomial hash of every prefix and suffix is computed with NumPy and looked up among the
    vocabulary's hashes; only the places both hashes find are cut and looked up in Python, so a
    hash collision can only cost time. The order: the original lists each token's merges in the
    scores' order and sorts them stably by (score, left length, right length); two merges of one
    token never tie (their left lengths differ), so listing them token by token and sorting the
    same way gives the same list."""
    if skip_tokens:  # never passed by the GGUF conversion; the original handles it
        from transformers.tokenization_utils_base import generate_merges as original

        return original(vocab, vocab_scores, skip_tokens)
    reverse = vocab_scores is not None
    scores = dict(vocab_scores) if reverse else vocab
    tokens, values = list(scores), list(scores.values())
    merges = []
    for r, i in zip(*(a.tolist() for a in _splits_found(tokens, vocab))):
        left, right = tokens[r][:i], tokens[r][i:]
        if left in vocab and right in vocab:
            merges.append((values[r], left, right))
    merges.sort(key=lambda v: (v[0], len(v[1]), len(v[2])), reverse=reverse)
    return [(a, b) for _, a, b in merges]


_BASE = 0x9E3779B97F4A7C15  # odd, so invertible modulo 2^64 (a suffix's hash is shifted back by its inverse)
_LENGTH = 0xC2B2AE3D27D4EB4F  # the length mixed into every key


def _powers(base: int, n: int) -> np.ndarray:
    out, x = np.empty(n, np.uint64), 1
    for j in range(n):
        out[j], x = x, x * base % (1 << 64)
    return out


def _prefix_hashes(strings: list[str]):
    """(lengths, offsets, prefix sums): string k's first i characters hash to
    ``P[o_k + i] - P[o_k]`` = sum of c_j * BASE^j for j < i, modulo 2^64."""
    lens = np.fromiter(map(len, strings), np.int64, len(strings))
    codes = np.frombuffer("".join(strings).encode("utf-32-le", "surrogatepass"), np.uint32).astype(np.uint64)
    offs = np.zeros(len(strings) + 1, np.int64)
    np.cumsum(lens, out=offs[1:])
    pos = np.arange(codes.size, dtype=np.int64) - np.repeat(offs[:-1], lens)
    prefix = np.zeros(codes.size + 1, np.uint64)
    np.cumsum(codes * _powers(_BASE, int(lens.max(initial=0)) + 1)[pos], out=prefix[1:])
    return lens, offs, prefix


def _splits_found(tokens: list[str], vocab: dict) -> tuple[np.ndarray, np.ndarray]:
    """(token index, split place) of every place where both pieces' hashes are among the
    vocabulary's, token by token, places in order."""
    vl, vo, vp = _prefix_hashes(list(vocab))
    keys = np.sort(vp[vo[1:]] - vp[vo[:-1]] + vl.astype(np.uint64) * np.uint64(_LENGTH))
    lens, offs, prefix = _prefix_hashes(tokens)
    counts = np.maximum(lens - 1, 0)
    rows = np.repeat(np.arange(len(tokens)), counts)
    first = np.zeros(len(tokens) + 1, np.int64)
    np.cumsum(counts, out=first[1:])
    split = np.arange(rows.size, dtype=np.int64) - first[rows] + 1
    base, n = offs[rows], lens[rows]
    left = prefix[base + split] - prefix[base]
    right = (prefix[base + n] - prefix[base] - left) * _powers(pow(_BASE, -1, 1 << 64), int(lens.max(initial=0)) + 1)[split]
    left_key = left + split.astype(np.uint64) * np.uint64(_LENGTH)
    right_key = right + (n - split).astype(np.uint64) * np.uint64(_LENGTH)

    def known(k: np.ndarray) -> np.ndarray:
        if not keys.size:
            return np.zeros(k.size, bool)
        return keys[np.minimum(np.searchsorted(keys, k), keys.size - 1)] == k

    ok = known(left_key)
    ok[ok] = known(right_key[ok])
    return rows[ok], split[ok]


@contextlib.contextmanager
def _fast_conversion(parsed: tuple[str, dict, dict]):
    """transformers' tokenizer classes read a GGUF through ``transformers.integrations.gguf
    .get_gguf_tokenizer`` (a second parse of the header) and derive merges with
    ``generate_merges``: for the length of the call, the first returns what this project's parser
    read, the second is the exact faster copy above. Restored afterwards, under a lock."""
    import transformers.integrations.gguf as tig
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping

    with _PATCH_LOCK:
        real_get, real_merges = tig.get_gguf_tokenizer, mapping.generate_merges
        tig.get_gguf_tokenizer = lambda path: (parsed[0], dict(parsed[1]), dict(parsed[2]))
        mapping.generate_merges = generate_merges
        try:
            yield
        finally:
            tig.get_gguf_tokenizer, mapping.generate_merges = real_get, real_merges


def tokenizer_class(config):
    """The class ``AutoTokenizer`` builds for a GGUF file of this config (no tokenizer_config.json
    beside it): the one registered for the config's type, else ``TokenizersBackend``."""
    from transformers import TokenizersBackend
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    cls = TOKENIZER_MAPPING.get(type(config), TokenizersBackend)
    if cls is None or cls.__name__ == "MistralCommonBackend":  # only for a folder of Mistral's own files
        cls = TokenizersBackend
    return cls


def tokenizer(path):
    """transformers' tokenizer for a GGUF file: the same class, vocabulary and settings as
    ``AutoTokenizer.from_pretrained(folder, gguf_file=name)``, the metadata read by this project's
    parser. A missing file raises ``ModelNotFoundError``.

    Example:
        >>> tok = tokenizer("model.gguf")
        >>> tok.convert_tokens_to_ids("<tok100>"), len(tok)
        (100, 4099)
    """
    from . import hf_convert as hf

    hf._deps()
    model = path if isinstance(path, GGUFModel) else shared_model(path)
    full = os.path.abspath(model.path)
    folder, name = os.path.dirname(full), os.path.basename(full)
    if not _has_gguf_tokenizer_module():  # an older transformers: its own (slower) path, the same result
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, gguf_file=name)
    parsed = gguf_tokenizer(model)
    cls = tokenizer_class(hf.config(model))
    with _fast_conversion(parsed):
        return cls.from_pretrained(folder, gguf_file=name)


def _has_gguf_tokenizer_module() -> bool:
    """Whether transformers reads GGUF tokenizers through ``integrations.gguf`` (5.24 and later)."""
    try:
        import transformers.integrations.gguf as tig
        from transformers.integrations.gguf import gguf_tokenizer_mapping
    except ImportError:
        return False
    return all(hasattr(m, a) for m, a in ((tig, "get_gguf_tokenizer"), (tig, "GGUF_TOKENIZER_MAPPING"),
                                           (gguf_tokenizer_mapping, "generate_merges")))
