"""How a model is spread over processes: PyTorch's own DDP and FSDP2 under torchrun.

The train loop asks this module three things: which rank am I (and which rows of the global batch
are mine), how do I wrap the model, and how do I combine a number across ranks. Backends are chosen
by what is available (NCCL with CUDA, gloo otherwise), never by device name.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

PARALLEL_MODES = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    mode: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1 or self.mode != "none"

    def rows(self, batch_size: int) -> range:
        """This rank's contiguous slice of a global batch of `batch_size` rows."""
        per = batch_size // self.size
        return range(self.rank * per, (self.rank + 1) * per)

    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def mean(self, value: float) -> float:
        """The mean of a per-rank number over all ranks (a no-op in one process)."""
        if not dist.is_initialized():
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device() if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return t.item() / self.size

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def launched_processes() -> int:
    """How many processes torchrun started for this job (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(mode: str) -> World:
    """Join the process group torchrun describes in the environment (or stay single-process).

    FSDP without torchrun runs as a group of one, so that a sharded run can be continued (or
    started) in a plain `palm train` process with the same code path and checkpoint format.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel mode must be one of {', '.join(PARALLEL_MODES)}")
    size = launched_processes()
    if mode == "none" and size == 1:
        return World()
    if mode == "none":
        mode = "ddp"
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend)
        else:  # not under torchrun: an in-process store, no port to pick or collide on
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), mode)


def shard(model: torch.nn.Module, world: World, bf16: bool) -> torch.nn.Module:
    """With FSDP, shard `model` in place (FSDP2 `fully_shard`); otherwise return it untouched.

    This must happen before the optimizer is built: fully_shard swaps every parameter for a
    DTensor holding this rank's shard, and the optimizer has to step those.
    """
    if world.mode != "fsdp":
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # bf16 compute only where bf16 matmuls are fast; gradients are reduced and kept in fp32 either way.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    # The tied embedding / lm head live in the root group, so the one tensor is sharded (and
    # gathered for the head) once.
    fully_shard(model, mp_policy=policy)
    return model


def wrap(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """The module the train step calls: a DDP wrapper, else the model itself (FSDP shards in place)."""
    if world.mode == "ddp" and world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.local_rank] if torch.cuda.is_available() else None
        return DistributedDataParallel(model, device_ids=ids)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a possibly sharded (DTensor) tensor; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def share_failure(error: Exception | None) -> Exception | None:
    """Rank 0's error (or None), raised on every rank alike, so that no rank waits for one that quit."""
    if not dist.is_initialized():
        return error
    box = [None if error is None else (type(error), str(error))]
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        return None
    kind, message = box[0]
    return error if error is not None else kind(message)


def teardown() -> None:
    """Leave the process group without gloo's exit-time crash (see the README): the caller drops its
    model and optimizer first; then sync, collect what still holds the group, and destroy it."""
    if not dist.is_initialized():
        return
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
