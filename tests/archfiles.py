"""Small synthetic files of every architecture ``hf`` supports, made once per folder: grouped-query
attention everywhere (so that a mix-up of q's and k's head counts shows), Qwen3 with 128-wide
heads (transformers reads no head size from a qwen3 file and takes 128), weights of a trained
model's size (so float16 logits stay finite)."""

import numpy as np

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


def with_extras(src, dst, kv: dict | None = None, tensors: dict | None = None):
    """A copy of the GGUF file ``src`` at ``dst`` with metadata keys added (str, float or int
    values: STRING, FLOAT32, UINT32) and float32 tensors appended, as a real file of the kind holds
    them (rope scaling keys, Llama 3's rope_freqs). Written by gguf-py, as its gguf_new_metadata does."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(str(src))
    w = GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue
        vt = f.types[0]
        w.add_key_value(f.name, f.contents(), vt, sub_type=f.types[-1] if vt == GGUFValueType.ARRAY else None)
    for k, v in (kv or {}).items():
        vt = GGUFValueType.STRING if isinstance(v, str) else GGUFValueType.FLOAT32 if isinstance(v, float) \
            else GGUFValueType.UINT32
        w.add_key_value(k, v, vt)
    extra = {k: np.asarray(v, np.float32) for k, v in (tensors or {}).items()}
    for t in r.tensors:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    for name, a in extra.items():
        w.add_tensor_info(name, a.shape, a.dtype, a.nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in r.tensors:
        w.write_tensor_data(t.data)
    for a in extra.values():
        w.write_tensor_data(a)
    w.close()
    return dst
