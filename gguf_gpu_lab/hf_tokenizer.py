"""transformers' tokenizer of a GGUF file, from this project's parser: the dict transformers' own
GGUF tokenizer reading builds (``transformers.integrations.gguf.get_gguf_tokenizer``), made from
``GGUFModel.metadata_value``, handed to transformers' own converter (``convert_gguf_tokenizer``)
through the tokenizer class ``AutoTokenizer`` picks for the file. The same tokenizer comes out,
without transformers' second parse of the header (and, for ``AutoTokenizer``, a third by gguf-py
to build the config) and with the merges a sentencepiece vocabulary implies derived by an exact,
faster copy of transformers' ``generate_merges``; its ``get_merges``, ``sentencepiece_tokenizer``
and ``add_gguf_special_tokens`` are replaced by copies that give the same result without building
the vocabulary as a dict three times (or asking the backend for all of it), for the length of the
call. About 0.9 s of CPU for a 262,144-token sentencepiece vocabulary on the 2-core machine
(transformers' own: about 26 s), the string array decoded in one call (``header._decode_strings``).

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
    scores = vocab if vocab_scores is None else vocab_scores
    return _merges(vocab, list(scores), list(scores.values()), vocab_scores is not None)


def _merges(vocab: dict, tokens: list[str], values: list, reverse: bool) -> list[tuple[str, str]]:
    """``generate_merges(vocab, dict(zip(tokens, values)))`` (``reverse``) or ``generate_merges(vocab)``,
    with ``tokens`` distinct."""
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
    names = list(vocab)
    lens, offs, prefix = _prefix_hashes(tokens)
    vl, vo, vp = (lens, offs, prefix) if names == tokens else _prefix_hashes(names)  # the same strings, as a rule
    keys = np.sort(vp[vo[1:]] - vp[vo[:-1]] + vl.astype(np.uint64) * np.uint64(_LENGTH))
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

    bits = max(10, min(26, int(keys.size).bit_length() + 4))  # a table of at least 16 bits a key
    table = np.zeros(1 << bits, bool)
    table[keys >> np.uint64(64 - bits)] = True

    def known(k: np.ndarray) -> np.ndarray:
        """Whether each key is among the vocabulary's: a bit table on the keys' top bits (a few
        percent of false positives) first, the sorted keys for what it lets through."""
        if not keys.size:
            return np.zeros(k.size, bool)
        ok = table[k >> np.uint64(64 - bits)]
        maybe = k[ok]
        ok[ok] = keys[np.minimum(np.searchsorted(keys, maybe), keys.size - 1)] == maybe
        return ok

    ok = known(left_key)
    ok[ok] = known(right_key[ok])
    return rows[ok], split[ok]


@contextlib.contextmanager
def _fast_conversion(parsed: tuple[str, dict, dict]):
    """transformers' tokenizer classes read a GGUF through ``transformers.integrations.gguf
    .get_gguf_tokenizer`` (a second parse of the header) and derive merges with
    ``generate_merges``: for the length of the call, the first returns what this project's parser
    read, the second is the exact faster copy above, and the builders that make the vocabulary's
    dicts are the copies below (those of them this transformers has). Restored afterwards, under
    a lock."""
    import transformers.integrations.gguf as tig
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping

    with _PATCH_LOCK:
        real_get = tig.get_gguf_tokenizer
        ours = {"generate_merges": generate_merges, "get_merges": _get_merges,
                "sentencepiece_tokenizer": _sentencepiece_tokenizer, "add_gguf_special_tokens": _add_gguf_special_tokens}
        real = {name: getattr(mapping, name) for name in ours if hasattr(mapping, name)}
        tables = _builder_tables(mapping)
        tig.get_gguf_tokenizer = lambda path: (parsed[0], dict(parsed[1]), dict(parsed[2]))
        for name in real:
            setattr(mapping, name, ours[name])
        for table, key, _, new in tables:
            table[key] = new
        try:
            yield
        finally:
            tig.get_gguf_tokenizer = real_get
            for name, f in real.items():
                setattr(mapping, name, f)
            for table, key, old, _ in tables:
                table[key] = old


def _builder_tables(mapping) -> list[tuple[dict, str, Any, Any]]:
    """(table, key, transformers' builder, ours) for each entry of transformers' builder tables
    that is its ``sentencepiece_tokenizer`` itself or a ``partial`` of it (the tables hold the
    function, so patching the module's name alone would not reach them)."""
    import functools

    original = getattr(mapping, "sentencepiece_tokenizer", None)
    out = []
    for table_name in ("GGUF_TOKENIZER_TYPES", "GGUF_SENTENCEPIECE_BUILDERS"):
        table = getattr(mapping, table_name, None)
        if original is None or not isinstance(table, dict):
            continue
        for key, f in table.items():
            if f is original:
                out.append((table, key, f, _sentencepiece_tokenizer))
            elif isinstance(f, functools.partial) and f.func is original:
                out.append((table, key, f, functools.partial(_sentencepiece_tokenizer, *f.args, **f.keywords)))
    return out


def _get_merges(tokenizer_dict: dict, vocab_scores: dict | None = None) -> list:
    """transformers' ``gguf_tokenizer_mapping.get_merges`` (5.24+), the same list: the file's
    merges, or the ones the vocabulary implies (``generate_merges`` above), its dicts built with
    ``dict(zip(...))`` (the same keys, values and order as its comprehensions)."""
    return _merges_of(tokenizer_dict, vocab_scores, None)


def _merges_of(tokenizer_dict: dict, vocab_scores: dict | None, vocab: dict | None) -> list:
    """``get_merges``, given the vocabulary dict when the caller has built it. When the tokens are
    distinct, ``dict(zip(tokens, scores))`` is the tokens and the scores as they are, so it is not built."""
    if "merges" in tokenizer_dict:
        return [tuple(merge.split(" ")) for merge in tokenizer_dict["merges"]]
    tokens = tokenizer_dict["tokens"]
    if vocab is None:
        vocab = dict(zip(tokens, range(len(tokens))))
    if vocab_scores is not None:
        return generate_merges(vocab, vocab_scores)
    scores = tokenizer_dict["scores"]
    if len(vocab) == len(tokens) == len(scores):
        return _merges(vocab, list(tokens), list(scores), True)
    return generate_merges(vocab, dict(zip(tokens, scores)))


def _sentencepiece_tokenizer(tokenizer_dict: dict, tokenizer_class=None, vocab_scores: dict | None = None):
    """transformers' ``gguf_tokenizer_mapping.sentencepiece_tokenizer`` (5.24+), its vocabulary dict
    built once for the class and the merges."""
    if tokenizer_class is None:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import LlamaTokenizer as tokenizer_class
    tokens = tokenizer_dict["tokens"]
    vocab = dict(zip(tokens, range(len(tokens))))
    return tokenizer_class(vocab=vocab, merges=_merges_of(tokenizer_dict, vocab_scores, vocab))


def _add_gguf_special_tokens(tok, tokenizer_dict: dict):
    """transformers' ``gguf_tokenizer_mapping.add_gguf_special_tokens`` (5.24+), the same tokens
    added in the same order: control tokens (type 3) as special ones (in a byte-level vocabulary
    only those spelled in its byte alphabet), user-defined ones (type 4) found in the vocabulary as
    plain added tokens. The tokens of each type are picked with NumPy, and "found in the
    vocabulary" asks the backend for the few user-defined tokens, where the original builds the
    whole vocabulary as a dict (0.8 s on 262,144 tokens)."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens, types = tokenizer_dict["tokens"], tokenizer_dict.get("token_type") or ()
    types = np.asarray(types[:len(tokens)])
    spelled = set(bytes_to_unicode().values()) if tokenizer_dict.get("tokenizer_type") == "gpt2" else None
    control = [AddedToken(tokens[i], normalized=False, special=True) for i in np.flatnonzero(types == 3).tolist()
               if spelled is None or set(tokens[i]) <= spelled]
    if control:
        tok.add_special_tokens({"additional_special_tokens": control}, replace_extra_special_tokens=False)
    backend = tok.backend_tokenizer
    user_defined = [AddedToken(tokens[i], normalized=False, special=False) for i in np.flatnonzero(types == 4).tolist()
                    if backend.token_to_id(tokens[i]) is not None]
    if user_defined:
        tok.add_tokens(user_defined)
    return tok


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
        import transformers
        from transformers import AutoTokenizer

        from .errors import warn

        warn(f"transformers {transformers.__version__} has no GGUF tokenizer module to hand this project's "
             "parse to (5.24 and later have one; the hf extra asks for them): hf.tokenizer uses "
             "AutoTokenizer's own GGUF path, which reads the header with gguf-py (tens of seconds on a "
             "vocabulary of 262,144 tokens)")
        with _tokens_as_a_set():
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


class _Tokens(list):
    """The token list, whose ``in`` asks a set of its items (built at the first ``in``): older
    transformers (``integrations.ggml.GGUFTokenizerSkeleton``) derive merges with
    ``piece in tokens`` on the list, once per place in every token: quadratic on a large
    vocabulary (minutes on 128k tokens). A list of str: ``in`` answers the same."""

    _set = None

    def __contains__(self, item) -> bool:
        if self._set is None:
            self._set = set(self)
        return item in self._set


# where older transformers define or import convert_gguf_tokenizer
_CONVERTER_MODULES = ("transformers.integrations.ggml", "transformers.integrations.gguf",
                      "transformers.tokenization_utils_fast", "transformers.tokenization_utils_tokenizers")


@contextlib.contextmanager
def _tokens_as_a_set():
    """For the length of the call, transformers' ``convert_gguf_tokenizer`` gets the tokenizer
    dict with its ``tokens`` as a ``_Tokens`` (the same list, a set behind ``in``). Under the lock;
    restored afterwards."""
    import importlib
    import sys

    with _PATCH_LOCK:
        patched = []
        for module_name in _CONVERTER_MODULES:
            if module_name not in sys.modules:
                with contextlib.suppress(ImportError):
                    importlib.import_module(module_name)
            module = sys.modules.get(module_name)
            real = getattr(module, "convert_gguf_tokenizer", None)
            if real is None or getattr(real, "_gguf_lab_real", None) is not None:
                continue

            def convert(architecture, tokenizer_dict, *args, _real=real, **kwargs):
                if isinstance(tokenizer_dict, dict) and isinstance(tokenizer_dict.get("tokens"), list):
                    tokenizer_dict = dict(tokenizer_dict, tokens=_Tokens(tokenizer_dict["tokens"]))
                return _real(architecture, tokenizer_dict, *args, **kwargs)

            convert._gguf_lab_real = real
            setattr(module, "convert_gguf_tokenizer", convert)
            patched.append((module, real))
        try:
            yield
        finally:
            for module, real in patched:
                module.convert_gguf_tokenizer = real
