"""What a synthetic file of each architecture holds: its tensors (names and shapes as llama.cpp's
converter writes them) and its metadata keys (what transformers' GGUF loader reads to build a config).

``synth(..., arch=...)`` uses these; the llama layout is the one ``synth`` has always written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGUFWriter

from ..errors import GGUFLabError


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")

# general.architecture of each: llama.cpp writes Mistral 7B-style models as llama; transformers reads
# a llama file whose general.name is exactly "mistral" as a Mistral model
_GGUF_ARCH = {"mistral": "llama"}

# no output.weight (the output layer is the embedding), as in Gemma and the small Qwen2/Qwen3 models
_TIED = frozenset({"qwen2", "qwen3", "gemma2", "gemma3"})


@dataclass(frozen=True)
class LlamaConfig:
    """The shape of a synthetic decoder (llama's names; every architecture here uses them)."""

    vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    context: int = 4096

    @property
    def n_params(self) -> int:
        kv = self.n_embd * self.n_embd * self.n_head_kv // self.n_head
        per_layer = 2 * self.n_embd * self.n_embd + 2 * kv + 3 * self.n_embd * self.n_ff + 2 * self.n_embd
        return 2 * self.vocab * self.n_embd + self.n_layer * per_layer + self.n_embd


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise GGUFLabError(f"arch (--arch): unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return arch


def gguf_arch(arch: str) -> str:
    """The ``general.architecture`` a synthetic file of ``arch`` states."""
    return _GGUF_ARCH.get(check_arch(arch), arch)


def tensor_shapes(arch: str, cfg: LlamaConfig) -> list[tuple[str, int, tuple[int, ...]]]:
    """(name, layer or -1, row-major shape) of every tensor of a model of ``arch``, in file order."""
    check_arch(arch)
    e, ff = cfg.n_embd, cfg.n_ff
    hd = e // cfg.n_head
    q, kv = cfg.n_head * hd, cfg.n_head_kv * hd
    shapes: list[tuple[str, int, tuple[int, ...]]] = [("token_embd.weight", -1, (cfg.vocab, e))]
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        layer = [(p + "attn_norm.weight", (e,))]
        if arch == "phi3":  # q, k and v in one tensor; gate and up in one tensor (ffn_up)
            layer += [(p + "attn_qkv.weight", (q + 2 * kv, e)), (p + "attn_output.weight", (e, q)),
                      (p + "ffn_norm.weight", (e,)), (p + "ffn_up.weight", (2 * ff, e)),
                      (p + "ffn_down.weight", (e, ff))]
        else:
            layer += [(p + "attn_q.weight", (q, e)), (p + "attn_k.weight", (kv, e)), (p + "attn_v.weight", (kv, e))]
            if arch == "qwen2":
                layer += [(p + "attn_q.bias", (q,)), (p + "attn_k.bias", (kv,)), (p + "attn_v.bias", (kv,))]
            if arch in ("qwen3", "gemma3"):
                layer += [(p + "attn_q_norm.weight", (hd,)), (p + "attn_k_norm.weight", (hd,))]
            layer.append((p + "attn_output.weight", (e, q)))
            if arch in ("gemma2", "gemma3"):
                layer.append((p + "post_attention_norm.weight", (e,)))
            layer += [(p + "ffn_norm.weight", (e,)), (p + "ffn_gate.weight", (ff, e)), (p + "ffn_up.weight", (ff, e)),
                      (p + "ffn_down.weight", (e, ff))]
            if arch in ("gemma2", "gemma3"):
                layer.append((p + "post_ffw_norm.weight", (e,)))
        shapes += [(name, i, shape) for name, shape in layer]
    shapes.append(("output_norm.weight", -1, (e,)))
    if arch not in _TIED:
        shapes.append(("output.weight", -1, (cfg.vocab, e)))
    return shapes


def add_metadata(w: GGUFWriter, arch: str, cfg: LlamaConfig, tokens: list[str]) -> None:
    """The model's hyperparameters and tokenizer for ``arch`` (the llama keys ``synth`` has always
    written, then what the other architectures add)."""
    hd = cfg.n_embd // cfg.n_head
    w.add_context_length(cfg.context)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    if arch in ("llama", "mistral", "phi3"):
        w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-5 if arch != "gemma2" else 1e-6)
    if arch != "llama":  # the llama file keeps the keys (and so the bytes) it always had
        w.add_rope_freq_base({"qwen2": 1e6, "qwen3": 1e6, "gemma3": 1e6}.get(arch, 1e4))
    if arch in ("qwen3", "gemma2", "gemma3"):  # head size stated, as these models' head_dim is not n_embd / n_head
        w.add_key_length(hd)
        w.add_value_length(hd)
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(min(cfg.context, 512))
    if arch == "gemma2":
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
    n = len(tokens)
    if arch in ("qwen2", "qwen3"):  # byte-level BPE, as Qwen's files have: tokens, types and merges
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types([1] * n)
        w.add_token_merges(_merges(tokens))
    else:
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(np.linspace(0.0, -1.0, n, dtype=np.float32).tolist())
        w.add_token_types([3] * min(3, n) + [1] * max(0, n - 3))  # 3: control, 1: normal
    if arch != "llama":
        ids = _SPECIAL_IDS.get(arch, {"bos": 1, "eos": 2})
        w.add_bos_token_id(min(ids["bos"], n - 1))
        w.add_eos_token_id(min(ids["eos"], n - 1))
        if "unk" in ids:
            w.add_unk_token_id(min(ids["unk"], n - 1))
        if "pad" in ids:
            w.add_pad_token_id(min(ids["pad"], n - 1))
    if arch == "phi3":  # Phi-3's files name one (32000); transformers' default is out of a small vocabulary
        w.add_pad_token_id(min(32000, n - 1))


# the first tokens of a sentencepiece vocabulary, where a tokenizer looks them up by name
_SPECIAL_TOKENS = {"gemma": ["<pad>", "<eos>", "<bos>", "<unk>"], "spm": ["<unk>", "<s>", "</s>"]}
_SPECIAL_IDS = {"gemma2": {"pad": 0, "eos": 1, "bos": 2, "unk": 3}, "gemma3": {"pad": 0, "eos": 1, "bos": 2, "unk": 3},
                "mistral": {"unk": 0, "bos": 1, "eos": 2}, "phi3": {"unk": 0, "bos": 1, "eos": 2}}


def tokens(arch: str, n: int, plain: list[str]) -> list[str]:
    """The vocabulary of a synthetic ``arch`` file: ``plain`` (for llama, as ``synth`` has always
    written it), with the special tokens the architecture's tokenizer needs in front."""
    if arch in ("qwen2", "qwen3"):
        return byte_level_tokens(n)
    if arch == "llama":
        return plain
    special = _SPECIAL_TOKENS["gemma" if arch.startswith("gemma") else "spm"][:n]
    return special + plain[len(special):]


_ALPHABET = [chr(c) for c in range(ord("!"), ord("~") + 1)]  # printable ASCII: letters of the byte-level alphabet


def byte_level_tokens(n: int) -> list[str]:
    """``n`` distinct byte-level BPE tokens: single letters, then pairs of them (each pair a merge)."""
    k = len(_ALPHABET)
    if n > k + k * k:
        raise GGUFLabError(f"vocab (--vocab): a synthetic byte-level vocabulary holds at most {k + k * k} tokens, got {n}")
    return _ALPHABET[:n] + [_ALPHABET[i % k] + _ALPHABET[i // k] for i in range(max(0, n - k))]


def _merges(tokens: list[str]) -> list[str]:
    return [f"{t[0]} {t[1]}" for t in tokens if len(t) == 2]
