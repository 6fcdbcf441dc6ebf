"""``hf.export`` (a GGUF to a Hugging Face safetensors folder) and ``hf.tokenizer`` against
transformers' own readers, on small synthetic files of every supported architecture, on the CPU
with the host backend: the folder loads with ``AutoModelForCausalLM.from_pretrained`` bit for bit
as ``hf.from_gguf`` builds the model, its tokenizer gives the same ids, the shards are safetensors
files the library reads, and every refusal happens before anything is written.

Needs the hf extra (torch, transformers, accelerate, safetensors): skipped without it, except where CI=true.
"""

import json
import os
import random
from collections import namedtuple

import pytest

from .needs import require


require("torch", "transformers", "accelerate", "safetensors")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from gguf_gpu_lab import GGUFLabError, export as export_module, export_ring, hf, hf_convert, open_model  # noqa: E402
from gguf_gpu_lab.errors import ModelNotFoundError  # noqa: E402
from gguf_gpu_lab.hf_tokenizer import generate_merges  # noqa: E402
from .archfiles import VOCAB, arch_file, other_arch_file  # noqa: E402
from .threads import lab_threads  # noqa: E402

transformers.logging.set_verbosity_error()

ARCHS = hf.SUPPORTED_ARCHITECTURES
INPUT = [[1, 5, 9, 30, 200, 7, 511]]
TEXTS = ["Hello world, the <tok100> \u00e9t\u00e9 \u4e2d\u6587 test", "  two  spaces\nand a line <s></s> ab!cd~",
         "<pad><eos><bos><unk> \u2581the7 ing9"]
NO_SPACE = r"model-\d+-of-\d+\.safetensors: writing tensor '(model|lm_head)\..*No space left"
SMALL_SHARDS = "300KB"  # a 1M-weight model in bfloat16 is about 2 MB: several shards


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


_file = arch_file


def _bits(t):
    return t.detach().cpu().contiguous().view(torch.uint8)


def _shard_names(out):
    return sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))


def _check_shards(out, layout_expected_names):
    """safe_open reads every shard; the index (several shards) names every tensor exactly once, in
    the shard that holds it."""
    seen: dict[str, str] = {}
    for name in _shard_names(out):
        with safe_open(os.path.join(out, name), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for k in f.keys():
                assert k not in seen, f"{k} in {seen.get(k)} and {name}"
                seen[k] = name
                f.get_tensor(k)
    assert set(seen) == set(layout_expected_names)
    index = os.path.join(out, export_module.INDEX_NAME)
    if len(seen) and len(_shard_names(out)) > 1:
        with open(index) as f:
            doc = json.load(f)
        assert doc["weight_map"] == seen
        assert doc["metadata"]["total_size"] == sum(os.path.getsize(os.path.join(out, n)) for n in _shard_names(out)) \
            - sum(_header_len(os.path.join(out, n)) for n in _shard_names(out))
    else:
        assert not os.path.exists(index) and _shard_names(out) == [export_module.WEIGHTS_NAME]
    return seen


def _header_len(path):
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


@pytest.mark.parametrize("arch,dtype,shards", [(a, "bfloat16", SMALL_SHARDS) for a in ARCHS]
                         + [("llama", "float32", "5GB"), ("gemma3", "float16", SMALL_SHARDS)], ids=str)
def test_folder_loads_as_from_gguf(model_dir, arch, dtype, shards):
    p = _file(model_dir, arch)
    out = model_dir / f"{arch}-{dtype}-{shards}"
    r = hf.export(p, out, dtype=dtype, max_shard_size=shards, budget="200KB", progress=False)
    assert r.out_dir == str(out) and set(r.files) == set(os.listdir(out))
    assert not [n for n in os.listdir(model_dir) if ".partial-" in n]
    ours, info = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype), output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    ref = hf.from_gguf(p, dtype=dtype, device="cpu")
    assert type(ours) is type(ref)
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), k
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.get_input_embeddings().weight
    with torch.no_grad():
        la, lb = ours(torch.tensor(INPUT)).logits, ref(torch.tensor(INPUT)).logits
    assert torch.isfinite(lb).all() and torch.equal(la, lb)
    written = _check_shards(out, [k for k in b if not (ours.config.tie_word_embeddings and k == "lm_head.weight")])
    assert r.n_tensors == len(written)
    if shards == SMALL_SHARDS:
        assert len(_shard_names(out)) > 1
    tok, gguf_tok = AutoTokenizer.from_pretrained(out), hf.tokenizer(p)
    for text in TEXTS:
        assert tok(text)["input_ids"] == gguf_tok(text)["input_ids"], text
    with open(out / "config.json") as f:
        assert json.load(f)["architectures"] == [type(ref).__name__]
    assert (out / "generation_config.json").exists()


@pytest.mark.parametrize("arch", ARCHS)
def test_config_and_tokenizer_files_are_transformers_own(model_dir, tmp_path, arch):
    """tokenizer.json and tokenizer_config.json are what ``AutoTokenizer.from_pretrained(dir,
    gguf_file=...).save_pretrained`` writes; config.json is ``AutoConfig.from_pretrained(dir,
    gguf_file=...)`` saved, with the two keys a saved model adds (``architectures``, ``dtype``)."""
    from transformers import AutoConfig

    p = _file(model_dir, arch)
    r = hf.export(p, tmp_path / "out", progress=False, device="cpu")
    ref = tmp_path / "ref"
    AutoTokenizer.from_pretrained(str(model_dir), gguf_file=p.name).save_pretrained(ref)
    AutoConfig.from_pretrained(str(model_dir), gguf_file=p.name,  # with where hf follows llama.cpp
                               **hf_convert.llama_cpp_config(open_model(p))).save_pretrained(ref)

    def read(folder, name):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            return json.load(f)

    assert read(r.out_dir, "tokenizer.json") == read(ref, "tokenizer.json")
    theirs = read(ref, "tokenizer_config.json")
    if theirs["tokenizer_class"] == "TokenizersBackend":  # transformers 4 knows it by its old name only
        theirs["tokenizer_class"] = "PreTrainedTokenizerFast"
    assert read(r.out_dir, "tokenizer_config.json") == theirs
    ours = read(r.out_dir, "config.json")
    v4 = export_module.v4_config_keys(read(ref, "config.json") | {"dtype": "bfloat16"})
    assert v4["torch_dtype"] == "bfloat16" and v4["rope_theta"] >= 1e4
    assert {k: ours.pop(k) for k in v4} == v4
    assert ours.pop("dtype") == "bfloat16" and ours.pop("architectures")[0].endswith("ForCausalLM")
    assert ours == read(ref, "config.json")


def test_v4_config_keys():
    """What transformers 4 reads, from transformers 5's rope_parameters: a flat one, one per
    attention type, a scaled one; nothing where the config has none."""
    v4 = export_module.v4_config_keys
    assert v4({}) == {}
    assert v4({"dtype": "float16", "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}) == {
        "torch_dtype": "float16", "rope_theta": 5e5}
    assert v4({"rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
                                   "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}}) == {
        "rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "rope_local_base_freq": 1e4}
    assert v4({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0,
                                   "partial_rotary_factor": 0.5}}) == {
        "rope_theta": 1e4, "partial_rotary_factor": 0.5, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    # Phi-3's longrope: the three keys transformers 4's Phi3Config accepts, and no other
    assert v4({"rope_parameters": {"rope_theta": 1e4, "rope_type": "longrope", "long_factor": [2.0],
                                   "short_factor": [1.0], "attention_factor": 1.2,
                                   "original_max_position_embeddings": 4096}})["rope_scaling"] == {
        "type": "longrope", "long_factor": [2.0], "short_factor": [1.0]}
    # transformers 5 reads the same rope from a config with them as without
    from transformers import Gemma3TextConfig, LlamaConfig

    for cls, c in ((LlamaConfig, {"rope_parameters": {"rope_theta": 5e5, "rope_type": "linear", "factor": 8.0}}),
                   (Gemma3TextConfig, {"rope_parameters": {
                       "full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
                       "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}})):
        assert cls.from_dict({**c, **v4(c)}).rope_parameters == cls.from_dict(c).rope_parameters == c["rope_parameters"]


def test_generation_stops_at_the_files_end_of_turn_tokens(model_dir, tmp_path):
    """generation_config.json lists the file's end-of-turn and end-of-message tokens after its eos
    (llama.cpp stops at them; transformers' GGUF config has the eos alone), each once, ids past the
    vocabulary left out; a file without them keeps transformers' single eos. The model
    ``hf.from_gguf`` builds generates with the same stops."""
    def gen(out):
        with open(out / "generation_config.json", encoding="utf-8") as f:
            return json.load(f)["eos_token_id"]

    p = _file(model_dir, "gemma2")
    hf.export(p, tmp_path / "plain", progress=False, device="cpu")
    assert gen(tmp_path / "plain") == 1
    m = open_model(p)
    m.metadata.update({"tokenizer.ggml.eot_token_id": 107, "tokenizer.ggml.eom_token_id": VOCAB + 5})
    hf.export(m, tmp_path / "chat", progress=False, device="cpu")
    assert gen(tmp_path / "chat") == [1, 107]
    m.metadata.update({"tokenizer.ggml.eot_token_id": 1, "tokenizer.ggml.eom_token_id": 108})
    assert hf.from_gguf(m, device="cpu", progress=False).generation_config.eos_token_id == [1, 108]


def test_generation_stops_at_the_end_of_turn_texts_llama_cpp_stops_at(model_dir, tmp_path, monkeypatch):
    """Most chat files name no eot token: their turns end with a token llama.cpp knows by its text
    (Gemma's <end_of_turn>, ChatML's <|im_end|>); generation stops there too, after the eos."""
    from gguf_gpu_lab import hf_convert

    m = open_model(_file(model_dir, "gemma2"))
    tokens = m.metadata_value("tokenizer.ggml.tokens")
    tokens[106], tokens[300] = "<end_of_turn>", "<|im_end|>"
    real = m.metadata_value
    monkeypatch.setattr(m, "metadata_value",
                        lambda key, **kw: tokens if key == "tokenizer.ggml.tokens" else real(key, **kw))
    assert hf_convert.stop_ids(m, 1, VOCAB) == [1, 106, 300]
    assert hf_convert.stop_ids(m, 1, 200) == [1, 106]  # ids past the vocabulary left out
    hf.export(m, tmp_path / "chat", progress=False, device="cpu", tokenizer=False)
    with open(tmp_path / "chat" / "generation_config.json", encoding="utf-8") as f:
        assert json.load(f)["eos_token_id"] == [1, 106, 300]


def test_budget_bounds_the_host_bytes(model_dir, monkeypatch):
    """At most ``budget`` bytes of weights wait on the host at once (a tensor larger than the budget
    alone): counted where the batches take and give their bytes."""
    peak, largest = [0], [0]
    real = export_module._Budget

    class Watched(real):
        def take(self, n):
            super().take(n)
            largest[0] = max(largest[0], n)
            peak[0] = max(peak[0], self.used)

    monkeypatch.setattr(export_module, "_Budget", Watched)
    budget = 100_000
    r = hf.export(_file(model_dir, "llama"), model_dir / "budget", budget=budget, progress=False, tokenizer=False)
    assert r.n_tensors > 10 and 0 < peak[0] <= max(budget, largest[0])
    assert "tokenizer.json" not in r.files


def test_progress_reaches_the_total(model_dir):
    calls = []
    hf.export(_file(model_dir, "qwen2"), model_dir / "progress", progress=lambda *a: calls.append(a), tokenizer=False)
    assert calls and calls[-1][0] == calls[-1][1] and [c[0] for c in calls] == sorted(c[0] for c in calls)


def test_refuses_a_non_empty_folder_and_overwrites_when_asked(model_dir):
    p = _file(model_dir, "llama")
    out = model_dir / "existing"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00007-of-00009.safetensors").write_text("stale")
    (out / "model-lora-adapter.safetensors").write_text("mine too")  # not a shard name: never removed
    with pytest.raises(GGUFLabError, match="exists and holds 3 entries.*overwrite"):
        hf.export(p, out, progress=False)
    assert sorted(os.listdir(out)) == ["model-00007-of-00009.safetensors", "model-lora-adapter.safetensors",
                                       "notes.txt"]
    r = hf.export(p, out, max_shard_size=SMALL_SHARDS, overwrite=True, progress=False, tokenizer=False)
    names = set(os.listdir(out))
    mine = {"notes.txt", "model-lora-adapter.safetensors"}
    assert mine <= names and "model-00007-of-00009.safetensors" not in names
    assert names == set(r.files) | mine
    assert (out / "model-lora-adapter.safetensors").read_text() == "mine too"
    r = hf.export(p, out, overwrite=True, progress=False, tokenizer=False)  # now one shard: the old ones go
    assert _shard_names(out) == ["model-lora-adapter.safetensors", "model.safetensors"]
    assert export_module.INDEX_NAME not in os.listdir(out)
    # another model's chat template and tokenizer, left by an earlier export: not this model's, removed
    for name in ("chat_template.jinja", "tokenizer.json", "special_tokens_map.json"):
        (out / name).write_text("another model's")
    r = hf.export(p, out, overwrite=True, progress=False, tokenizer=False)
    assert set(os.listdir(out)) == set(r.files) | mine and "chat_template.jinja" not in r.files
    empty = model_dir / "empty"
    empty.mkdir()
    hf.export(p, empty, progress=False, tokenizer=False)
    assert (empty / "model.safetensors").exists()
    with pytest.raises(GGUFLabError, match="not a folder"):
        hf.export(p, p, progress=False)


def test_a_tokenizer_that_fails_ends_the_export_before_the_weights_do(model_dir, tmp_path, monkeypatch):
    """The tokenizer is built beside the weights; its error ends the export at the next batch,
    not after every weight is written, and nothing is left."""
    import threading

    from gguf_gpu_lab import hf_tokenizer

    failed = threading.Event()

    def broken(model):
        failed.set()
        raise GGUFLabError(f"{model.path}: tokenizer.ggml.eos_token_id is 999999, outside the vocabulary")

    monkeypatch.setattr(hf_tokenizer, "tokenizer", broken)
    written = []

    def progress(done, total, name):
        failed.wait(10)  # the tokenizer has failed before the first batch is done
        written.append(done)
        return True

    r = hf.export(_file(model_dir, "llama"), tmp_path / "whole", budget="1MB", progress=False, tokenizer=False)
    with pytest.raises(GGUFLabError, match="eos_token_id is 999999"):
        hf.export(_file(model_dir, "llama"), tmp_path / "out", budget="1MB", progress=progress)
    assert r.weight_bytes > 3 * 2**20 and (not written or written[-1] <= 2**20)  # a batch or two at most, of all of it
    assert os.listdir(tmp_path) == ["whole"]


def test_a_folder_filled_during_the_export_is_left_alone(model_dir, tmp_path):
    """The folder was empty (or missing) when the export began and holds a file of someone else's
    by its end (another export, a user): an OutputExistsError, their file untouched, nothing of
    this export left behind."""
    from gguf_gpu_lab import OutputExistsError

    p = _file(model_dir, "llama")
    out = tmp_path / "out"

    def fill(done, total, name):
        if not out.exists():
            out.mkdir()
            (out / "config.json").write_text("theirs")
    with pytest.raises(OutputExistsError, match="filled while the export ran"):
        hf.export(p, out, progress=fill, tokenizer=False)
    assert os.listdir(out) == ["config.json"] and (out / "config.json").read_text() == "theirs"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_what_a_killed_export_left_is_named_by_the_next(model_dir, tmp_path):
    p = _file(model_dir, "llama")
    left = tmp_path / ".out.partial-0123456789ab"
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"h" * 5000)
    with pytest.warns(UserWarning, match=r"out.partial-0123456789ab: left by an unfinished export of .*out "
                                         r"\(0.00 GB on disk\); remove it if no export"):
        hf.export(p, tmp_path / "out", progress=False, tokenizer=False)
    assert sorted(os.listdir(tmp_path)) == [left.name, "out"]  # named, never removed


def test_an_index_never_makes_the_export_remove_a_file(model_dir, tmp_path):
    """An index in the folder that lists other files (the user's): --overwrite removes only
    shard-named files."""
    p = _file(model_dir, "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("mine")
    (out / "adapter_model.safetensors").write_text("mine")
    (out / export_module.INDEX_NAME).write_text(json.dumps(
        {"weight_map": {"a": "README.md", "b": "adapter_model.safetensors"}}))
    hf.export(p, out, overwrite=True, progress=False, tokenizer=False)
    assert {"README.md", "adapter_model.safetensors"} <= set(os.listdir(out))


def test_a_link_to_an_empty_folder_takes_the_export(model_dir, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "out").symlink_to(real)
    hf.export(_file(model_dir, "llama"), tmp_path / "out", progress=False, tokenizer=False)
    assert (tmp_path / "out").is_symlink() and (real / "model.safetensors").exists()


def test_a_file_at_out_dir_appearing_during_the_export(model_dir, tmp_path):
    from gguf_gpu_lab import OutputExistsError

    p = _file(model_dir, "llama")
    out = tmp_path / "out"

    def fill(done, total, name):
        if not out.exists():
            out.write_text("theirs")
    with pytest.raises(OutputExistsError, match="a file .not a folder. appeared there"):
        hf.export(p, out, progress=fill, tokenizer=False)
    assert out.read_text() == "theirs" and sorted(os.listdir(tmp_path)) == ["out"]


def test_refusals_write_nothing(model_dir, tmp_path, monkeypatch):
    p = _file(model_dir, "llama")
    out = tmp_path / "out"
    cases = [({"dtype": "int8"}, "dtype must be one of"), ({"max_shard_size": "0"}, "max_shard_size must be from"),
             ({"max_shard_size": "lots"}, r"max_shard_size must be a size such as '5GB' \(units KB, MB, GB, TB\) "
                                          r"or a number of bytes, got 'lots'"),
             ({"max_shard_size": "5GiB"}, "max_shard_size must be a size"), ({"max_shard_size": "nan"}, "must be a size"),
             ({"budget": 10**15}, "budget must be from"), ({"progress": "yes"}, "progress must be None or False"),
             ({"max_shard_size": 1.5}, "max_shard_size must be a size"),
             ({"device": "tpu"}, "device must be 'auto', 'cuda', 'cuda:N' or 'cpu', got 'tpu'")]
    for kwargs, message in cases:
        with pytest.raises(GGUFLabError, match=message):
            hf.export(p, out, **{"progress": False, **kwargs})
    with pytest.raises(GGUFLabError, match="architecture 'bert' is not supported"):
        hf.export(other_arch_file(tmp_path / "bert.gguf", "bert"), out, progress=False)
    with pytest.raises(ModelNotFoundError):
        hf.export(tmp_path / "missing.gguf", out, progress=False)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(export_module.shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(GGUFLabError, match=r"needs \d.* GB .*disk has 0.00 GB free \(1000 bytes\)"):
        hf.export(p, out, progress=False)
    assert os.listdir(tmp_path) == ["bert.gguf"]


def test_a_failed_write_leaves_nothing(model_dir, tmp_path, monkeypatch):
    _failing_pwrite(monkeypatch, 8)
    with pytest.raises(GGUFLabError, match="No space left"):
        hf.export(_file(model_dir, "llama"), tmp_path / "out", max_shard_size=SMALL_SHARDS, budget="100KB",
                  progress=False)
    assert os.listdir(tmp_path) == []


def test_layout_is_the_safetensors_format():
    tensors = [(f"t{i}", f"g{i}", (3, 5 + i)) for i in range(6)]
    layout = export_module.plan_layout(tensors, "bfloat16", 80, total_parameters=123)
    assert len(layout.headers) > 1 and layout.index["metadata"]["total_parameters"] == 123
    for file, head in layout.headers.items():
        n = int.from_bytes(head[:8], "little")
        assert n % 8 == 0 and len(head) == 8 + n
        doc = json.loads(head[8:])
        ends = [doc[e.name]["data_offsets"] for e in layout.entries if e.file == file]
        assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:]))
        assert layout.sizes[file] == len(head) + ends[-1][1]
    assert [e.nbytes for e in layout.entries] == [30, 36, 42, 48, 54, 60]
    assert [len(b) for b in export_module.batches(layout.entries, 70)] == [2, 1, 1, 1, 1]
    assert export_module.parse_size("2GB", "budget") == 2 * 10**9 and export_module.parse_size("1000", "x") == 1000


def _same_files(a, b):
    assert a.files == b.files
    for name in a.files:
        with open(os.path.join(a.out_dir, name), "rb") as fa, open(os.path.join(b.out_dir, name), "rb") as fb:
            assert fa.read() == fb.read(), name


def _failing_pwrite(monkeypatch, at: int):
    real, calls = export_module._pwrite, [0]

    def failing(fd, data, offset, file, name):
        calls[0] += 1
        if calls[0] == at:
            raise GGUFLabError(f"{file}: writing tensor {name!r}: No space left on device")
        return real(fd, data, offset, file, name)

    monkeypatch.setattr(export_module, "_pwrite", failing)


def _export_threads():
    return [name for name in lab_threads() if name.startswith("gguf-lab-export")]


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3"])
def test_the_gpu_writes_the_same_files(model_dir, arch, monkeypatch):
    """Dequantized on the GPU (gpu mode) and copied out through the ring of pinned buffers, the
    shards are byte for byte the host backend's: with buffers of 4 KiB (most tensors in pieces,
    small ones sharing a buffer) and with the default ones."""
    p = _file(model_dir, arch)
    kw = {"max_shard_size": SMALL_SHARDS, "budget": "300KB", "progress": False, "tokenizer": False}
    b = hf.export(p, model_dir / f"{arch}-on-cpu", device="cpu", **kw)
    a = hf.export(p, model_dir / f"{arch}-on-gpu", device="cuda", **kw)
    _same_files(a, b)
    assert len(_shard_names(a.out_dir)) > 1
    monkeypatch.setattr(export_ring, "RING_BUFFER_BYTES", 4096)
    assert max(e.nbytes for e in _layout_of(p)) > 4096
    _same_files(hf.export(p, model_dir / f"{arch}-on-gpu-4k", device="cuda", **kw), b)
    assert not _export_threads()


@pytest.mark.gpu
def test_a_failed_write_from_the_gpu_leaves_nothing(model_dir, tmp_path, monkeypatch):
    import gc

    monkeypatch.setattr(export_ring, "RING_BUFFER_BYTES", 4096)
    _failing_pwrite(monkeypatch, 40)
    with pytest.raises(GGUFLabError, match=NO_SPACE):
        hf.export(_file(model_dir, "llama"), tmp_path / "out", max_shard_size=SMALL_SHARDS, budget="100KB",
                  progress=False, device="cuda")
    gc.collect()
    assert os.listdir(tmp_path) == [] and not _export_threads()
    torch.cuda.synchronize()


def _layout_of(p):
    from gguf_gpu_lab.hf_convert import _Conversion
    from gguf_gpu_lab.model import shared_model

    conv = _Conversion(shared_model(p), "bfloat16")
    made = {conv.names[g]: g for g in conv.wanted}
    return export_module.plan_layout([(n, made[n], tuple(t.shape)) for n, t in conv.hf_model.state_dict().items()
                                      if n in made], "bfloat16", 10**9).entries


# -- the ring, on the host ------------------------------------------------------------------------

def _ring_on_host(monkeypatch, buffer_bytes):
    """The export's device path with the ring's host copies and plain (unpinned) buffers."""
    monkeypatch.setattr(export_ring, "RING_BUFFER_BYTES", buffer_bytes)
    monkeypatch.setattr(export_module, "pinned_buffers",
                        lambda torch_, n, nbytes: [torch_.empty(nbytes, dtype=torch_.uint8) for _ in range(n)])
    monkeypatch.setattr(export_module, "DeviceToHost", lambda torch_, device: export_ring.HostCopy())

    def through_the_ring(torch_, conv, layout, fds, limit, progress, opts, check):
        export_module._write_from_device(torch_, conv, layout, fds, "host", 0, limit, progress, opts, check)

    monkeypatch.setattr(export_module, "_write_on_host", through_the_ring)


@pytest.mark.parametrize("buffer_bytes", [4096, 1 << 20], ids=["4KiB", "1MiB"])
def test_the_ring_writes_the_same_files(model_dir, monkeypatch, buffer_bytes):
    """The device path's ring, with host copies: the same files as the host path, tensors larger
    than a buffer in pieces and small ones sharing one; progress counts every byte once, in order."""
    p = _file(model_dir, "gemma3")
    kw = {"max_shard_size": SMALL_SHARDS, "budget": "300KB", "tokenizer": False, "device": "cpu"}
    b = hf.export(p, model_dir / f"ring-ref-{buffer_bytes}", progress=False, **kw)
    _ring_on_host(monkeypatch, buffer_bytes)
    calls = []
    a = hf.export(p, model_dir / f"ring-{buffer_bytes}", progress=lambda *c: calls.append(c), **kw)
    _same_files(a, b)
    assert calls[-1][0] == calls[-1][1] == sum(e.nbytes for e in _layout_of(p))
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert not _export_threads()


def test_a_failed_write_through_the_ring_leaves_nothing(model_dir, tmp_path, monkeypatch):
    _ring_on_host(monkeypatch, 4096)
    _failing_pwrite(monkeypatch, 30)
    with pytest.raises(GGUFLabError, match=NO_SPACE):
        hf.export(_file(model_dir, "llama"), tmp_path / "out", max_shard_size=SMALL_SHARDS, budget="100KB",
                  progress=False, device="cpu")
    assert os.listdir(tmp_path) == [] and not _export_threads()


def test_the_ring_pieces_and_offsets(tmp_path):
    """Tensors of 0 to 2.5 buffers into one file at scattered offsets, three buffers, two writers:
    every byte lands where it was sent; a failed write is raised with every writer joined and
    every buffer back; an error on the caller's side writes nothing more."""
    rng = torch.Generator().manual_seed(0)
    sizes = [1, 100, 0, 250, 7, 99, 100, 101, 3, 180]
    srcs = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=rng) for n in sizes]
    offsets = [sum(sizes[:i]) * 2 + 5 for i in range(len(sizes))]  # gaps between the tensors
    path = tmp_path / "f.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        def write(fd_, data, offset, file, name):
            assert fd_ == fd and file == "f.bin"
            os.pwrite(fd_, data.tobytes(), offset)

        buffers = [torch.empty(100, dtype=torch.uint8) for _ in range(3)]
        seen = []
        with export_ring.Ring(buffers, export_ring.HostCopy(), write, writers=2,
                              progress=lambda *c: seen.append(c), total=sum(sizes)) as ring:
            ring.begin()
            for i, (src, off) in enumerate(zip(srcs, offsets)):
                ring.put(src, fd, off, "f.bin", f"t{i}")
        data = path.read_bytes()
        for i, (src, off) in enumerate(zip(srcs, offsets)):
            assert data[off:off + len(src)] == src.numpy().tobytes(), i
        assert seen[-1][:2] == (sum(sizes), sum(sizes)) and ring.free.qsize() == 3

        def failing(fd_, data, offset, file, name):
            if name == "t5":
                raise GGUFLabError(f"{file}: writing tensor {name!r}: No space left on device")

        with pytest.raises(GGUFLabError, match="f.bin: writing tensor 't5'"):
            with export_ring.Ring(buffers, export_ring.HostCopy(), failing, writers=2) as ring:
                for i, (src, off) in enumerate(zip(srcs * 5, offsets * 5)):
                    ring.put(src, fd, off, "f.bin", f"t{i}")
        assert not any(t.is_alive() for t in ring.threads) and ring.free.qsize() == 3

        written = []
        with pytest.raises(KeyError):
            with export_ring.Ring(buffers, export_ring.HostCopy(), lambda *a: written.append(a[4])) as ring:
                ring.put(srcs[1], fd, 0, "f.bin", "t1")
                raise KeyError("the caller's")
        assert written == [] and not any(t.is_alive() for t in ring.threads) and ring.free.qsize() == 3
    finally:
        os.close(fd)
    assert export_ring.ring_buffer_bytes(2 * 10**9) == 64 << 20 and export_ring.ring_buffer_bytes(1000) == 64 << 10


def test_the_host_path_gives_freed_batches_back(tmp_path):
    """Peak memory of a host export of a 100M-weight file (182 MB in bfloat16) with budget 64MB,
    in a fresh process after a warm-up export (imports, transformers' model modules): it grows by
    at most the budget + 48 MB. The 48 MB: half the budget for the batch being built beyond its
    output (its quantized bytes, the dequantizer's float32 scratch of one tensor, a transform's
    copy), 16 MB for what glibc keeps of small allocations and the interpreter's own. Without the
    fixed mmap threshold, glibc keeps freed batches (141 MB here, 185 MB at 300M weights)."""
    if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
        pytest.skip("the mmap threshold is glibc's")
    import subprocess
    import sys

    from gguf_gpu_lab.tools.synth import synth

    big, tiny = tmp_path / "big.gguf", tmp_path / "tiny.gguf"
    synth(big, "100M", "Q4_K_M", seed=1, vocab=VOCAB, arch="llama", weights="small")
    synth(tiny, "1M", "Q4_K_M", seed=1, vocab=VOCAB, arch="llama", weights="small")
    code = (
        "import sys\n"
        "from gguf_gpu_lab import hf\n"
        "def status(key):\n"
        "    with open('/proc/self/status') as f:\n"
        "        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))\n"
        "kw = dict(budget='64MB', progress=False, tokenizer=False, device='cpu')\n"
        "hf.export(sys.argv[1], sys.argv[3] + '-warm', **kw)\n"
        "try:\n"
        "    with open('/proc/self/clear_refs', 'w') as f:\n"
        "        f.write('5')\n"  # VmHWM from here
        "except OSError:\n"
        "    sys.exit(3)\n"
        "before = status('VmRSS')\n"
        "r = hf.export(sys.argv[2], sys.argv[3], **kw)\n"
        "print(status('VmHWM') - before, r.weight_bytes)\n")
    root = os.path.dirname(os.path.dirname(export_module.__file__))
    run = subprocess.run([sys.executable, "-c", code, str(tiny), str(big), str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": root, "GGUF_LAB_WARMUP": "0"})
    if run.returncode == 3:
        pytest.skip("/proc/self/clear_refs cannot be written here: no peak to reset")
    assert run.returncode == 0, run.stderr
    growth, weights = map(int, run.stdout.split()[-2:])
    assert weights > 150 * 10**6 and growth <= 64 * 10**6 + 48 * 10**6, (growth, weights)


# -- the tokenizer --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_is_transformers_own(model_dir, arch):
    """The same class, backend (tokenizer.json) and ids as AutoTokenizer.from_pretrained(gguf_file=...)."""
    p = _file(model_dir, arch)
    ours = hf.tokenizer(p)
    ref = AutoTokenizer.from_pretrained(str(model_dir), gguf_file=p.name)
    assert type(ours) is type(ref)
    assert ours.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()
    assert ours.special_tokens_map == ref.special_tokens_map
    for text in TEXTS:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text


def test_tokenizer_leaves_transformers_as_it_was(model_dir):
    """transformers' functions and builder tables are its own again after hf.tokenizer."""
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping

    names = ("generate_merges", "get_merges", "sentencepiece_tokenizer", "add_gguf_special_tokens")
    before = {n: getattr(mapping, n) for n in names}
    tables = {n: dict(getattr(mapping, n)) for n in ("GGUF_TOKENIZER_TYPES", "GGUF_SENTENCEPIECE_BUILDERS")}
    hf.tokenizer(_file(model_dir, "gemma3"))
    assert {n: getattr(mapping, n) for n in names} == before
    assert {n: dict(getattr(mapping, n)) for n in tables} == tables
    assert all(f.__module__.startswith("transformers") for f in before.values())


def test_tokenizer_with_an_older_transformers(model_dir, monkeypatch):
    """Without transformers.integrations.gguf's tokenizer module (before 5.24), transformers' own path."""
    from gguf_gpu_lab import hf_tokenizer

    monkeypatch.setattr(hf_tokenizer, "_has_gguf_tokenizer_module", lambda: False)
    monkeypatch.setattr(hf_tokenizer, "gguf_tokenizer", lambda model: pytest.fail("our reading was used"))
    p = _file(model_dir, "gemma3")
    with pytest.warns(UserWarning, match="no GGUF tokenizer module .*tens of seconds") as seen:
        tok = hf.tokenizer(p)
    assert seen[0].filename == __file__  # the user's own line, not the toolkit's
    assert tok(TEXTS[0])["input_ids"] == AutoTokenizer.from_pretrained(
        str(model_dir), gguf_file=p.name)(TEXTS[0])["input_ids"]


def test_older_transformers_get_the_tokens_with_a_set_behind_in(model_dir, monkeypatch):
    """On the older path, transformers' converter sees the token list as a ``_Tokens`` (the same
    list; ``in`` through a set), and its own function is back afterwards."""
    from gguf_gpu_lab import hf_tokenizer
    import transformers.integrations.gguf as tig

    tokens = hf_tokenizer._Tokens(["a", "b", "ab"])
    assert tokens == ["a", "b", "ab"] and "ab" in tokens and "ba" not in tokens and tokens[1:] == ["b", "ab"]
    real, seen = tig.convert_gguf_tokenizer, []

    def watching(architecture, tokenizer_dict, *args, **kwargs):
        seen.append(type(tokenizer_dict["tokens"]))
        return real(architecture, tokenizer_dict, *args, **kwargs)

    monkeypatch.setattr(tig, "convert_gguf_tokenizer", watching)
    monkeypatch.setattr(hf_tokenizer, "_has_gguf_tokenizer_module", lambda: False)
    p = _file(model_dir, "llama")
    with pytest.warns(UserWarning, match="no GGUF tokenizer module"):
        tok = hf.tokenizer(p)
    assert tok(TEXTS[1])["input_ids"] == AutoTokenizer.from_pretrained(
        str(model_dir), gguf_file=p.name)(TEXTS[1])["input_ids"]
    assert seen == [hf_tokenizer._Tokens, list] and tig.convert_gguf_tokenizer is watching


def test_tokenizer_of_a_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        hf.tokenizer(tmp_path / "nothing.gguf")


def test_generate_merges_is_transformers_own():
    from transformers.tokenization_utils_base import generate_merges as original

    rng = random.Random(0)
    alphabets = ["ab\u2581c\u00e9\u4e2d", "ab", "a\U0001f600b\ud800", "xyz "]  # one with a lone surrogate
    for trial in range(60):
        alphabet = alphabets[trial % len(alphabets)]
        toks = list(dict.fromkeys("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7)))
                                  for _ in range(rng.randint(1, 300))))
        toks += toks[:3]  # a repeated token, as dict(zip(tokens, scores)) sees it
        vocab = {t: i for i, t in enumerate(toks)}
        scores = dict(zip(toks, (rng.choice([0.0, -1.0, -2.5, rng.random()]) for _ in toks)))
        assert generate_merges(vocab, scores) == original(vocab, scores), trial
        assert generate_merges(vocab) == original(vocab), trial
        positions = {t: -i for i, t in enumerate(toks)}  # Gemma's key
        assert generate_merges(vocab, positions) == original(vocab, positions), trial
    assert generate_merges({}) == [] and generate_merges({"a": 0}) == []
    dense = [chr(c) for c in range(33, 123)]  # every pair of 90 letters: 8,100 merges
    dense += [a + b for a in dense for b in dense]
    vocab, positions = {t: i for i, t in enumerate(dense)}, {t: -i for i, t in enumerate(dense)}
    assert generate_merges(vocab, positions) == original(vocab, positions)


# -- the command line and the benchmark -----------------------------------------------------------

def test_cli_export(model_dir, capsys):
    from gguf_gpu_lab.cli import main

    p, out = _file(model_dir, "gemma2"), model_dir / "cli"
    assert main(["export", str(p), str(out), "--dtype", "float16", "--max-shard-size", SMALL_SHARDS, "--device", "cpu"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(["export", str(p), str(out), "--device", "cpu"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(p), str(out), "--overwrite", "--device", "cpu", "--budget", "1MB"]) == 0
    assert _shard_names(out) == ["model.safetensors"]
    capsys.readouterr()
    for flag, value in [("--max-shard-size", "abc"), ("--budget", "0")]:  # argparse names the flag, in one line
        with pytest.raises(SystemExit) as e:
            main(["export", str(p), str(out), flag, value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"error: argument {flag}: must be" in err and err.count("\n") == 1


def test_bench_export_on_the_host(tmp_path):
    """The benchmark's own path, small and on the CPU (the lead runs it on a GPU with the 8B file):
    every phase in its child process, the result saved after each."""
    from gguf_gpu_lab.tools.bench_export import bench_export, format_export

    saved = []
    res = bench_export(params="1M", device="cpu", work_dir=str(tmp_path), baseline_params="1M", vocab=VOCAB,
                       tokenizer_vocab=2000, time_limit=600, save=lambda r: saved.append(json.loads(json.dumps(r))))
    assert [len(s["phases_s"]) for s in saved] == [1, 2, 3, 4, 5] and saved[-1] == json.loads(json.dumps(res))
    assert res["export"]["wall_s"] > 0 and res["disk"]["write_gb_s"] > 0 and res["ratio_to_disk"] > 0
    from gguf_gpu_lab.export_ring import RING_WRITERS

    by = res["disk"]["by_writers"]  # one thread and the export's writers; the faster is the disk's speed
    assert set(by) == {"1", str(RING_WRITERS)} and res["disk"]["write_gb_s"] == max(by.values())
    assert res["export"]["peak_rss_bytes"] > res["export"]["rss_before_bytes"] > 0
    assert res["baseline"]["transformers_s"] > 0 and res["baseline"]["bit_identical"]
    assert "written by neither" in res["baseline"]["tokenizer"]
    assert res["tokenizer"]["ours_s"] > 0 and res["tokenizer"]["vocab"] == 2000
    ref = res["tokenizer_reference"]
    assert ref["same_ids"] and ref["same_backend"] and ref["same_class"] and ref["transformers_s"] > 0
    assert set(res["meets_targets"]) == {"vs_disk", "peak_rss", "tokenizer"}
    assert "export" in format_export(res) and os.listdir(tmp_path) == []


def test_bench_export_baseline_on_its_own_file(tmp_path):
    """``baseline_params="same"``: transformers' path on the benchmark's own file, before the
    tokenizer phases, the file left as it was (the benchmark removes it with its folder)."""
    from gguf_gpu_lab.tools.bench_export import bench_export, format_export

    res = bench_export(params="1M", device="cpu", work_dir=str(tmp_path), baseline_params="same", vocab=VOCAB,
                       tokenizer_vocab=None, time_limit=600)
    b = res["baseline"]
    assert list(res["phases_s"]) == ["disk", "export", "baseline"]
    assert b["file"] == res["model"]["path"] and b["file_bytes"] == res["model"]["file_bytes"] and b["bit_identical"]
    assert f"{b['file']}: export" in format_export(res) and os.listdir(tmp_path) == []


def test_a_stopped_phase_says_where_it_was(tmp_path):
    """A phase killed at its time limit has written every thread's stack a second before."""
    import subprocess

    from gguf_gpu_lab.tools.bench_export import _run_phase

    with pytest.raises(subprocess.TimeoutExpired) as e:
        _run_phase("tokenizer", {"work": str(tmp_path), "vocab": 1_000_000}, 8.0)  # about 15 s of work
    err = e.value.stderr.decode() if isinstance(e.value.stderr, bytes) else e.value.stderr
    assert "most recent call first" in err and "bench_export.py" in err


def test_bench_export_keeps_what_it_measured_when_time_runs_out(tmp_path, capsys):
    """A phase still running at the time limit is killed and recorded; the later ones are skipped;
    the JSON (bench --export --time-limit on the command line) is written after each."""
    from gguf_gpu_lab.cli import main

    out = tmp_path / "r.json"
    assert main(["bench", "--export", "--params", "1M", "--time-limit", "2", "--out", str(out),
                 "--out-dir", str(tmp_path / "work")]) == 0
    res = json.loads(out.read_text())
    assert res["time_limit_s"] == 2 and "timed_out_after_s" in res["disk"] and "stacks" in res["disk"]
    assert all("skipped" in res[k] for k in ("export", "tokenizer", "baseline", "tokenizer_reference"))
    captured = capsys.readouterr()
    assert "disk: stopped by the time limit" in captured.out and "export: skipped" in captured.out
    assert "bench --export: the disk's sequential write speed" in captured.err
    assert main(["bench", "--cpu", "--time-limit", "5"]) == 2
    assert "--time-limit is for bench --export" in capsys.readouterr().err
