"""Small synthetic files of every architecture ``hf`` supports, made once per folder: grouped-query
attention everywhere (so that a mix-up of q's and k's head counts shows), Qwen3 with 128-wide
heads (transformers reads no head size from a qwen3 file and takes 128), weights of a trained
model's size (so float16 logits stay finite)."""

from gguf_gpu_lab.tools.synth import synth

HEADS = {"qwen3": (2, 1)}
VOCAB = 512


def arch_file(folder, arch: str, mix: str = "Q4_K_M"):
    p = folder / f"{arch}-{mix}.gguf"
    if not p.exists():
        heads, kv = HEADS.get(arch, (4, 2))
        synth(p, "1M", mix, seed=11, vocab=VOCAB, arch=arch, heads=heads, kv_heads=kv, weights="small")
    return p


def other_arch_file(path, arch: str):
    """A minimal file of an architecture ``hf`` does not support (one float32 embedding)."""
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
