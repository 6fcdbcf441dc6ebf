"""Tensor-parallel transformers models from a GGUF file, under ``torchrun``: each rank reads only
its shards.

The model is the one ``from_pretrained(..., tp_plan="auto")`` builds: transformers' own plan
(``base_model_tp_plan``, the head's ``_tp_plan``) applied by transformers' own
``apply_tensor_parallelism`` to the meta model, which turns each planned parameter into a meta
``DTensor`` with its placements and installs the forward hooks. Each such parameter's placement
becomes a loader shard: ``Shard(0)`` (``colwise``, the vocabulary of ``embedding_rowwise``) is a
run of whole GGUF rows, one byte range; ``Shard(1)`` (``rowwise``) a segment of every row. The
rank's shards are loaded by ``load(shard=...)``, transformed by transformers' processors with the
rank's share of the heads (llama's q/k permutation runs inside each head), and wrapped by
``DTensor.from_local`` with the parameter's own shape and stride.

    torchrun --nproc-per-node 2 -m gguf_gpu_lab.tools.tp_run model.gguf --device cpu
    model = hf.from_gguf("model.gguf", device="cpu", tp_plan="auto")   # inside each rank's script

Collectives, all before any tensor byte is read or after every rank has finished: one that checks
every rank opened the same file (size and a digest of the header), one after the load that makes a
rank's failure every rank's error; the process group's timeout bounds a rank that dies outright.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import time
from typing import Any

from .errors import GGUFLabError
from .loader import Shard, ShardError
from .model import GGUFModel

_QKV_HEADS = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads", "v_proj": "num_key_value_heads"}


def check_heads(config: dict, world: int, path: str) -> None:
    """A ``ShardError`` now, before any rank starts, where a world of ``world`` ranks does not
    divide the attention heads (or key/value heads) of ``config`` (``hf.config_dict`` of the file
    at ``path``; ``plan_shards`` checks every tensor again on the ranks)."""
    for key in dict.fromkeys(_QKV_HEADS.values()):
        heads = config.get(key)
        if isinstance(heads, int) and heads % world:
            raise ShardError(f"{path}: {key} = {heads}, which a world of {world} ranks does not divide")


class TensorParallelError(GGUFLabError, RuntimeError):
    """A tensor-parallel load failed on some rank, or the ranks disagree: the message names them."""


def file_identity(model: GGUFModel) -> tuple[int, str]:
    """(file size, SHA-256 of the header and tensor table): what every rank must agree on."""
    return model.file_size, hashlib.sha256(model.source.read(0, model.data_offset)).hexdigest()


def init_distributed(device_type: str, timeout_s: float):
    """``torch.distributed`` set up from torchrun's environment (once): NCCL for CUDA, gloo for
    the CPU; collectives give up after ``timeout_s`` seconds."""
    import torch
    import torch.distributed as dist

    if not 1 <= timeout_s <= 86400:
        raise GGUFLabError(f"timeout_s must be from 1 to 86400 seconds, got {timeout_s!r}")
    if dist.is_initialized():
        return dist
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise GGUFLabError(f"tp_plan needs torch.distributed: run under torchrun (missing {', '.join(missing)}), "
                           "or call torch.distributed.init_process_group first")
    kw: dict[str, Any] = {}
    if device_type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
        kw["device_id"] = dev
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return dist


def _agree(dist, value) -> list:
    """Every rank's ``value``, by rank (one all-gather)."""
    got: list = [None] * dist.get_world_size()
    dist.all_gather_object(got, value)
    return got


def _tp_mesh(hf, conv, device_mesh, device_type: str):
    """Apply transformers' plan to the meta model: on its own mesh, as ``from_pretrained`` makes it
    (when ``device`` is of the accelerator's type), else on the tp dimension of ``device_mesh`` (by
    default a mesh of the whole world on the device's type: ``device="cpu"`` on a GPU host).
    Returns the tp mesh, or None for a world of one."""
    try:  # the DTensor tensor-parallel path of transformers 5.24 and later (the hf extra's floor)
        from transformers.distributed import DistributedConfig
        from transformers.distributed.tensor_parallel import apply_tensor_parallelism
    except ImportError as e:
        import transformers

        raise GGUFLabError(f"tp_plan needs transformers' DTensor tensor parallelism (5.24 or later); "
                           f"transformers {transformers.__version__} lacks it ({e})") from None
    import torch
    import torch.distributed as dist

    if device_mesh is None and dist.get_world_size() == 1:  # one rank: nothing to shard
        return None
    accel = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if device_mesh is None and (accel.type if accel is not None else "cpu") == device_type:
        dc, _, manager = type(hf).prepare_distribute_model(DistributedConfig(tp_plan="auto"))
        type(hf).maybe_distribute_model(hf, dc, manager)
        return manager.get_mesh("tp")
    if device_mesh is None:  # transformers would build its mesh on the accelerator: one on the device's type
        from torch.distributed.device_mesh import init_device_mesh

        device_mesh = init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("tp",))
    names = device_mesh.mesh_dim_names or ()
    mesh = device_mesh["tp"] if "tp" in names else device_mesh
    if mesh.ndim != 1:
        raise GGUFLabError(f"device_mesh must be 1-D or have a 'tp' dimension, got dimensions {names or mesh.ndim}")
    if mesh.device_type != device_type:
        raise GGUFLabError(f"device_mesh is on {mesh.device_type!r}, device on {device_type!r}")
    dc = DistributedConfig(tp_plan="auto", tp_size=mesh.size())
    plan, _, _ = hf._resolve_parallel_plans(dc)
    hf.config.distributed_config = dc
    hf._device_mesh, hf._tp_size = device_mesh, mesh.size()
    apply_tensor_parallelism(hf, mesh, plan)
    return mesh


def plan_shards(conv, mesh) -> tuple[dict[str, Shard], dict[str, tuple]]:
    """GGUF name -> this rank's ``Shard`` for every parameter the plan made a DTensor, and
    transformers name -> (placements, global shape, stride); a world size that does not divide a
    split dimension, or the heads of a split attention projection, is a ``ShardError`` naming the
    tensor and the sizes (on every rank alike, before anything is read)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Replicate
    from torch.distributed.tensor.placement_types import Shard as TShard

    rank, count = mesh.get_local_rank(), mesh.size()
    params = dict(conv.hf_model.named_parameters())
    shards: dict[str, Shard] = {}
    layouts: dict[str, tuple] = {}
    by_gguf = {t.name: t for t in conv.model.tensors}
    for g in conv.wanted:
        name = conv.names[g]
        p = params.get(name)
        if not isinstance(p, DTensor):
            continue
        info = by_gguf[g]
        if tuple(p.shape) != tuple(info.np_shape):
            raise ShardError(f"{conv.model.path}: tensor {g!r} has shape {info.np_shape}, transformers' {name} "
                             f"{tuple(p.shape)}")
        layouts[name] = (tuple(p.placements), tuple(p.shape), p.stride())
        (pl,) = p.placements
        if isinstance(pl, Replicate):
            continue
        if not isinstance(pl, TShard):
            raise ShardError(f"{conv.model.path}: {name}: placement {pl} is not a Shard or Replicate")
        dim = pl.dim - p.ndim if pl.dim >= 0 else pl.dim
        module = name.rsplit(".", 2)[-2]
        key = _QKV_HEADS.get(module)
        if key is not None and dim == -2:
            heads = conv.config_dict.get(key)
            if heads and heads % count:
                raise ShardError(f"{conv.model.path}: tensor {g!r} ({name}): {key} = {heads}, which a world of "
                                 f"{count} ranks does not divide")
        shards[g] = Shard(dim, rank, count)
    from .loader.shard import resolve_cuts

    resolve_cuts([by_gguf[g] for g in shards], shards, conv.model.path)  # every size checked now
    return shards, layouts


class _ShardProcessor:
    """transformers' processor, given the rank's share of the heads for the sharded tensors: the
    q/k un-permutation reorders rows inside each head, and a rank holds whole heads."""

    def __init__(self, conv, shards: dict[str, Shard], count: int):
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        cfg = dict(conv.config_dict)
        for key in ("num_attention_heads", "num_key_value_heads"):
            if isinstance(cfg.get(key), int):
                cfg[key] //= count
        self.whole, self.shards = conv.processor, shards
        self.part = TENSOR_PROCESSORS.get(conv.arch, TensorProcessor)(config=cfg)

    def process(self, weights, name, **kw):
        return (self.part if name in self.shards else self.whole).process(weights=weights, name=name, **kw)


def from_gguf_tp(path, dtype: str, device, attn_implementation, device_mesh, timeout_s: float, load_options):
    """``hf.from_gguf(..., tp_plan="auto")``: see the module's docstring."""
    import torch
    from torch.distributed.tensor import DTensor

    from . import hf_convert as _hf
    from .model import shared_model

    t0 = time.perf_counter()
    dev = torch.device(device)
    dist = init_distributed(dev.type, timeout_s)
    world = dist.get_world_size()
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)  # NCCL's object collectives run on the current device
    try:
        model = path if isinstance(path, GGUFModel) else shared_model(path)
        identity = file_identity(model)
    except GGUFLabError as e:  # still reach the collective, or the other ranks would wait for this one
        model, identity = None, ("error", f"{type(e).__name__}: {e}")
    ids = _agree(dist, identity)
    failed = {r: v[1] for r, v in enumerate(ids) if v[0] == "error"}
    if failed:
        raise TensorParallelError(f"{os.fspath(getattr(path, 'path', path))}: ranks {sorted(failed)} could not open "
                                  f"the file (rank {min(failed)}: {failed[min(failed)]})")
    odd = [r for r, v in enumerate(ids) if v != ids[0]]
    if odd:
        raise TensorParallelError(f"{model.path}: ranks {odd} opened another file than rank 0 (size, header digest: "
                                  f"{ids[odd[0]][0]}, {ids[odd[0]][1][:12]} against {ids[0][0]}, {ids[0][1][:12]})")
    _, backend, index = _hf._device(dev)
    t_dist = time.perf_counter() - t0
    conv = _hf._Conversion(model, dtype, attn_implementation)
    hf = conv.hf_model
    _untie(hf)
    t_plan = time.perf_counter()
    mesh = _tp_mesh(hf, conv, device_mesh, dev.type)
    shards, layouts = plan_shards(conv, mesh) if mesh is not None else ({}, {})
    conv.steps.update(distributed_s=t_dist, tp_plan_s=time.perf_counter() - t_plan)
    if shards:
        conv.processor = _ShardProcessor(conv, shards, mesh.size())
    result = state = error = None
    try:
        t1 = time.perf_counter()
        result = _hf.load(model, dtype=dtype, tensors=conv.wanted, backend=backend, device=index,
                          shard=shards or None, **load_options)
        conv.steps["load_s"] = time.perf_counter() - t1
        state = conv.state_dict(result, backend, index, load_options)
    except Exception as e:  # every rank must reach the status collective, or the others would wait
        error = e
    status = _agree(dist, None if error is None else f"{type(error).__name__}: {error}")
    bad = {r: s for r, s in enumerate(status) if s is not None}
    if bad:
        result = state = None
        first = min(bad)
        raise TensorParallelError(f"{model.path}: the tensor-parallel load failed on rank(s) {sorted(bad)} of {world} "
                                  f"(rank {first}: {bad[first]})") from error
    t2 = time.perf_counter()
    with torch.no_grad():
        for name, local in state.items():
            module_name, _, pname = name.rpartition(".")
            module = hf.get_submodule(module_name)
            old = module._parameters[pname]
            if name in layouts:
                placements, shape, stride = layouts[name]
                local = DTensor.from_local(local.to(dev), mesh, placements, run_check=False, shape=shape, stride=stride)
            module._parameters[pname] = torch.nn.Parameter(local, requires_grad=old.requires_grad)
    _tie_and_check(hf, conv, model, set(state))
    _hf._finish(hf, dev)
    steps = {**conv.steps, "assign_s": time.perf_counter() - t2, "total_s": time.perf_counter() - t0}
    hf.gguf_load_result = result
    hf.gguf_steps_s = steps
    return hf


def _untie(hf) -> None:
    """A parameter shared by two modules (the tied output layer) made two on the meta model, as in
    ``from_pretrained`` where weights are tied after loading: the plan shards each module's own
    parameter, and transformers' ``apply_tensor_parallelism`` lists parameters without duplicates."""
    import torch

    seen: set[int] = set()
    for mod in hf.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) in seen:
                mod._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="meta"),
                                                           requires_grad=p.requires_grad)
            seen.add(id(p))


def _tie_and_check(hf, conv, model, loaded: set[str]) -> None:
    """Tie the output to the embeddings where the file has no output (as transformers does), and
    check no parameter is left on the meta device."""
    if conv.config.tie_word_embeddings:
        missing = {n for n, _ in hf.named_parameters(remove_duplicate=False)} - loaded
        hf.tie_weights(missing_keys=missing, recompute_mapping=False)
    left = [n for n, p in hf.named_parameters() if p.is_meta]
    if left:
        raise GGUFLabError(f"{model.path}: the weights do not fit {type(hf).__name__}: {len(left)} parameters never "
                           f"filled, first {left[0]}")
