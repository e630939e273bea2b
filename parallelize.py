"""Data parallelism for main.py (torchtitan's `parallelize` idea): DDP or FSDP2 wrapping, gradient-sync control,
rank reductions, and what sharding means for N:M masks. model.py, sparsity.py and distill.py never ask.

    --parallel ddp    every rank holds the whole model, masks and optimizer state; gradients all-reduced
    --parallel fsdp   torch.distributed.fsdp.fully_shard on every block and the root: each rank stores 1/world
                      of the weights (whole rows), their gradients and optimizer state; the teacher is sharded
                      the same way (frozen), unless --shard_teacher False keeps a full copy on every rank

Masks under FSDP. FSDP2 shards parameters by rows (dim 0) and leaves buffers alone, so shard_masks() keeps in
each sparse layer's `mask` / `init_mask` only the rows of that rank's weight shard (of an expert weight
[experts, out, in]: its experts). N:M groups run along a row, so a mask recompute (and Wanda's scores: the
input statistic is per input channel, the same on every rank; per expert, this rank's experts') is local with
no communication, and SR-STE's decay is local too. The forward needs the full mask beside the full weight FSDP
gathers: each sharded block gathers its layers' mask rows, bit-packed (1/16 of the bf16 weight's
all-gather), in one collective before its forward and drops them after. Checkpoints store each mask as a DTensor
sharded like its weight (checkpoint.save_sharded).
"""
import contextlib
import inspect
import math
import os
import sys

import torch
import torch.distributed as dist

from cli import UserError, check_device
from sparsity import sparse_layers

PARALLEL = ("ddp", "fsdp")
PTDTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BITS = None


# ------------------------------------------------------------------------------------------------ the process
class Runtime:
    """Rank, world size, device, autocast context and data-parallel mode of this process; rank reductions.

    Under torchrun the process group is set up here (NCCL on GPUs, gloo on CPU). Control flags (a stop signal
    on some rank) travel over a second, gloo group on the CPU, so that checking them never waits for the GPU.
    """

    def __init__(self, cfg):
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.parallel = cfg.parallel
        if self.parallel == "fsdp" and not self.ddp:
            raise UserError("--parallel fsdp shards the model over the ranks of torchrun: launch with "
                            "`torchrun --nproc_per_node=N main.py ...` (N = 1 works too)")
        device = check_device(cfg.device)  # auto resolved; a GPU that is not there is a one-line error
        if device.startswith("cuda"):
            if self.ddp:
                device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(device)
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (outside autocast) on tensor cores
            torch.backends.cudnn.allow_tf32 = True
        self.device = device
        self.device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
        dtype = cfg.dtype
        if dtype == "auto":
            bf16_ok = self.device_type == "cuda" and torch.cuda.is_bf16_supported()
            dtype = "bfloat16" if bf16_ok else "float32"
        self.dtype = dtype
        if dtype == "float32":
            self.ctx = contextlib.nullcontext()
        else:
            if self.device_type == "cpu" and self.rank == 0:
                print(f"warning: {dtype} autocast on CPU is usually far slower than float32", file=sys.stderr)
            self.ctx = torch.autocast(device_type=self.device_type, dtype=PTDTYPE[dtype])
        self.control = None
        if self.ddp:
            backend = cfg.backend if cfg.backend != "auto" else ("nccl" if self.device_type == "cuda" else "gloo")
            dist.init_process_group(backend=backend)
            self.control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
        self.master = self.rank == 0

    def close(self):
        if self.ddp and dist.is_initialized():
            dist.destroy_process_group()

    def all_reduce_sum(self, t):
        if self.ddp:
            dist.all_reduce(t)
        return t

    def all_reduce_mean(self, t):
        return self.all_reduce_sum(t) / self.world_size if self.ddp else t

    def gather(self, obj) -> list:
        """obj of every rank, in rank order (every rank must call it at the same step)."""
        if not self.ddp:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def any_rank(self, flag: bool) -> bool:
        """True if any rank's flag is set (every rank must call it at the same step); CPU only, no GPU sync."""
        if not self.ddp:
            return flag
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return bool(t.item())


# ------------------------------------------------------------------------------------------------ wrapping
def wrap_ddp(model, rt):
    from torch.nn.parallel import DistributedDataParallel as DDP

    # masks are identical on every rank by construction: no need to broadcast buffers each forward
    no_buffer_sync = ({"forward_sync_buffers": False}  # torch >= 2.13 spelling of broadcast_buffers
                      if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                      else {"broadcast_buffers": False})
    return DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None, **no_buffer_sync)


def apply_fsdp(model, rt, bf16=False):
    """Shard model in place with fully_shard, block by block then the root; masks follow their weights' rows.

    bf16: MixedPrecisionPolicy with bf16 parameters for compute and fp32 gradient reduction (GPUs); else fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(rt.device_type, (rt.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    shard_masks(model, rt.rank, rt.world_size)
    model.fsdp_mesh = mesh
    return model


def is_sharded(model) -> bool:
    return getattr(model, "fsdp_mesh", None) is not None


def grad_sync(model, rt, last: bool):
    """Gradients are reduced on the last micro-step only; the context covers forward and backward (DDP's
    no_sync must include the forward). FSDP: set_requires_gradient_sync delays the reduce-scatter instead."""
    if is_sharded(model):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if rt.ddp and not last:
        return model.no_sync()
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------ masks
def local_rows(rows: int, rank: int, world: int):
    """[lo, hi) of the rows FSDP2 (torch.chunk semantics) gives rank out of `rows`."""
    chunk = -(-rows // world)
    lo = min(rank * chunk, rows)
    return lo, min(lo + chunk, rows)


def shard_masks(model, rank, world):
    """Keep only this rank's rows of every mask, and gather the full masks around each block's forward."""
    for _, layer in sparse_layers(model):
        rows = layer.weight.shape[0]  # a linear's output rows, or a mixture-of-experts weight's experts
        lo, hi = local_rows(rows, rank, world)
        if layer.weight.to_local().shape[0] != hi - lo:
            raise RuntimeError(f"FSDP sharded {rows} rows as {layer.weight.to_local().shape[0]} "
                               f"on rank {rank}, expected {hi - lo}: please report this as a bug")
        layer.mask = layer.mask[lo:hi].clone()
        layer.init_mask = layer.init_mask[lo:hi].clone()
        layer.shard_rows = slice(lo, hi)
    for block in model.blocks:
        layers = [layer for _, layer in sparse_layers(block)]
        if layers:
            block.register_forward_pre_hook(lambda module, args, layers=layers: gather_masks(layers, world))
            block.register_forward_hook(lambda module, args, out, layers=layers: _drop_masks(layers))


def _bits(device):
    global _BITS
    if _BITS is None or _BITS.device != device:
        _BITS = (2 ** torch.arange(8, dtype=torch.uint8)).to(device)
    return _BITS


def _pack(mask, rows):
    """A bool (≤ rows, ...) mask padded to `rows` rows, 8 entries per byte."""
    padded = torch.zeros(rows, *mask.shape[1:], dtype=torch.bool, device=mask.device)
    padded[:len(mask)] = mask
    flat = padded.flatten()
    flat = torch.cat([flat, flat.new_zeros(-len(flat) % 8)])
    return (flat.view(-1, 8).to(torch.uint8) * _bits(mask.device)).sum(-1, dtype=torch.uint8)


def _unpack(packed, rows, row_shape):
    """_pack's inverse: (rows, *row_shape) bools; row_shape is a linear's (in,) or an expert weight's (out, in)."""
    row_shape = (row_shape,) if isinstance(row_shape, int) else tuple(row_shape)
    bits = (packed.unsqueeze(-1) & _bits(packed.device)) != 0
    return bits.flatten()[:rows * math.prod(row_shape)].view(rows, *row_shape)


@torch.no_grad()
def gather_masks(layers, world):
    """One all-gather of the bit-packed mask rows of these layers; each gets its full mask in gathered_mask."""
    chunks = [-(-layer.weight.shape[0] // world) for layer in layers]
    packed = [_pack(layer.mask, rows) for layer, rows in zip(layers, chunks)]
    sizes = [len(p) for p in packed]
    mine = torch.cat(packed)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    for i, (layer, rows) in enumerate(zip(layers, chunks)):
        start = sum(sizes[:i])
        parts = [_unpack(buf[start:start + sizes[i]], rows, layer.weight.shape[1:]) for buf in everyone]
        layer.gathered_mask = torch.cat(parts)[:layer.weight.shape[0]]


def _drop_masks(layers):
    for layer in layers:
        layer.gathered_mask = None
