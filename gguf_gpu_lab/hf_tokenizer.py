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
    """transformers' ``tokenization_utils_base.generate_merges``: the same list in the same order,
    about twice as fast (a comprehension per token and in-place sorts instead of its loops; the
    rest of its time is making and hashing every split of every token). On a 262,144-token
    sentencepiece vocabulary it is the largest part of the conversion."""
    if skip_tokens:  # never passed by the GGUF conversion; the original handles it
        from transformers.tokenization_utils_base import generate_merges as original

        return original(vocab, vocab_scores, skip_tokens)
    reverse = vocab_scores is not None
    scores = dict(vocab_scores) if reverse else vocab
    merges: list[tuple[str, str, Any]] = []
    for merge, score in scores.items():
        local = [(merge[:i], merge[i:], score) for i in range(1, len(merge)) if merge[:i] in vocab and merge[i:] in vocab]
        if len(local) > 1:
            local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=reverse)
    return [(a, b) for a, b, _ in merges]


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
    from . import hf

    hf._deps()
    model = path if isinstance(path, GGUFModel) else shared_model(path)
    parsed = gguf_tokenizer(model)
    cls = tokenizer_class(hf.config(model))
    full = os.path.abspath(model.path)
    with _fast_conversion(parsed):
        return cls.from_pretrained(os.path.dirname(full), gguf_file=os.path.basename(full))
