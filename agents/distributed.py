"""Data-parallel training on `torch.distributed`: the processes ("ranks") an agent trains on, and the few
collective operations that make their update the single-process update of the whole batch.

Every agent takes the process group that is initialised when it is built (``torchrun`` initialises it through
`init_from_environment`; the Python API: ``torch.distributed.init_process_group`` before building the agent) and
otherwise runs alone (`Ranks.single`, under which every operation here is the identity). The design, in short:

* **One batch, split by rank.** ``episodes_per_update`` (DPO: ``batch_size``) is the *global* batch: rank r of W
  collects (or takes) rows ``r·B/W … (r+1)·B/W − 1`` of it with its own vector env. Every loss is normalised by the
  global token or episode count, every batch statistic (whitening, the moving average, explained variance) is
  summed over the ranks, and the gradients are **summed** over the ranks with one explicit all-reduce before the
  optimizer step (`Ranks.sum_gradients`): the summed gradient is the single-process gradient of the whole batch,
  so its norm (for clipping) and Adam's step are the same on every rank and equal to one process's.
* **Why not DDP.** `DistributedDataParallel` averages gradients inside ``backward`` and expects every rank to run
  the same forwards. Here a rank's share of a PPO minibatch can be empty, the env runs the policy outside the
  wrapper, and the normalisation is already global; one all-reduce after the micro-batches is exact and plain.
  (What it gives up: DDP's overlap of communication with ``backward``.)
* **Two random streams.** Each agent has ``rng`` and ``generator`` (this rank's: prompts, reset seeds, samples)
  and ``shared_rng`` (the same on every rank: PPO's minibatch order and ptx demonstrations, DPO's order of the
  pairs). One process uses one numpy generator for both, seeded with ``seed`` as before; rank r of W > 1 seeds
  its own streams with ``numpy.random.SeedSequence([seed, r])`` (`rank_generators`) and the shared one with
  ``seed``.

Collectives run on CPU tensors under gloo and on the current CUDA device under NCCL. Legend: ``W`` ranks.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


class RanksDisagree(ValueError):
    """The ranks were given different settings (config, env) that must be the same on every rank."""


class RankFailed(RuntimeError):
    """Another rank raised during a step that every rank takes together (a save, a load); its error is quoted."""


class WorldSizeMismatch(ValueError):
    """A checkpoint saved by W ranks loaded into another number of ranks (each rank's random streams are saved)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a data-parallel run: ``rank`` of ``world_size``.

    Built by `Ranks.current` (the initialised default process group, or one process alone). ``world_size == 1``
    makes every method the identity, with no communication."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """The default process group's rank and size if one is initialised, else a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files (metrics, checkpoints, summaries) and shows progress."""
        return self.rank == 0

    @property
    def single(self) -> bool:
        return self.world_size == 1

    def _device(self) -> torch.device:
        """Where collectives run: the current CUDA device under NCCL, the CPU otherwise (gloo)."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ---------------------------------------------------------------- reductions
    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks (a new tensor on `tensor`'s device; `tensor` itself unchanged)."""
        if self.single:
            return tensor
        out = tensor.detach().to(self._device(), copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(tensor.device)

    def max(self, value: float) -> float:
        """The largest of the ranks' `value`."""
        if self.single:
            return value
        out = torch.tensor([value], dtype=torch.float64, device=self._device())
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return float(out)

    def all(self, flag: bool) -> bool:
        """True iff `flag` is True on every rank (the ranks then take the same branch)."""
        if self.single:
            return bool(flag)
        out = torch.tensor([int(bool(flag))], device=self._device())
        dist.all_reduce(out, op=dist.ReduceOp.MIN)
        return bool(out)

    def any(self, flag: bool) -> bool:
        """True iff `flag` is True on some rank."""
        return not self.all(not flag)

    def sum_floats(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over the ranks (one all-reduce in float64; every rank must pass the same keys)."""
        if self.single or not values:
            return dict(values)
        keys = sorted(values)
        out = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._device())
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return dict(zip(keys, out.tolist()))

    def cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """The ranks' `tensor` (same shape on every rank) concatenated along dim 0 in rank order: ``(W·n, …)``."""
        if self.single:
            return tensor
        local = tensor.detach().to(self._device()).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(tensor.device)

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order: ``[obj]`` for one process."""
        if self.single:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` (picklable), on every rank."""
        if self.single:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ---------------------------------------------------------------- parameters and gradients
    @torch.no_grad()
    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each parameter's ``.grad`` by its sum over the ranks, in place.

        A parameter with a gradient on some rank but not on this one (e.g. its share of a minibatch was empty)
        takes part with zeros; one without a gradient on any rank keeps ``grad = None``, as it would in one
        process (Adam then leaves it alone). One all-reduce per dtype, over the flattened gradients."""
        if self.single:
            return
        device = self._device()
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX)
        live = [p for p, here in zip(params, present.tolist()) if here]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for dtype in sorted({p.grad.dtype for p in live}, key=str):
            group = [p for p in live if p.grad.dtype == dtype]
            flat = torch.cat([p.grad.reshape(-1).to(device) for p in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in group:
                p.grad.copy_(flat[offset: offset + p.numel()].view_as(p.grad))
                offset += p.numel()

    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers, copied into `module` on every rank (as DDP does when it wraps one)."""
        if self.single:
            return
        device = self._device()
        for tensor in [*module.parameters(), *module.buffers()]:
            data = tensor.data.to(device, copy=True)
            dist.broadcast(data, src=0)
            tensor.data.copy_(data.to(tensor.device))

    # ---------------------------------------------------------------- agreement
    def check_same(self, what: str, value) -> None:
        """`RanksDisagree` on every rank unless `value` (picklable, comparable) is equal on every rank."""
        values = self.gather(value)
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise RanksDisagree(f"the ranks were given different {what}: rank 0 has {values[0]!r}, rank {differ[0]} "
                                f"has {values[differ[0]]!r}; every rank must be built the same way")

    def agreed(self, step: Callable[[], object]):
        """Run `step` on every rank and return its result, or raise on every rank if it raised on any: its own
        error where it failed, `RankFailed` quoting the first failed rank's error elsewhere (so that no rank
        goes on to a collective the others never reach)."""
        try:
            result, error = step(), None
        except Exception as raised:  # re-raised below, on every rank
            result, error = None, raised
        if self.single:
            if error is not None:
                raise error
            return result
        messages = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed:
            raise RankFailed(f"rank {failed[0][0]} failed: {failed[0][1]}")
        return result


SINGLE = Ranks()
"""One process alone (rank 0 of 1): the default wherever ranks are optional."""


def rank_generators(seed: int, ranks: Ranks) -> tuple[np.random.Generator, torch.Generator]:
    """This rank's numpy and torch generators: seeded with `seed` in one process (as before data-parallel runs
    existed), with ``SeedSequence([seed, rank])`` on rank r of W > 1, so that the ranks sample different prompts and
    tokens, reproducibly."""
    if ranks.single:
        return np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    sequence = np.random.SeedSequence([seed, ranks.rank])
    torch_seed = int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))  # 63 bits
    return np.random.default_rng(sequence), torch.Generator().manual_seed(torch_seed)


def rank_share(total: int, ranks: Ranks, what: str) -> int:
    """`total` / W, or a `ValueError` naming `what` when the ranks cannot split it evenly."""
    if total % ranks.world_size:
        raise ValueError(f"{what} ({total}) must be a multiple of the number of ranks ({ranks.world_size}): each "
                         "rank takes an equal share of the batch")
    return total // ranks.world_size


def init_from_environment(device: str = "auto", timeout_s: float = 1800) -> tuple[Ranks, str]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), initialise the default process group and return
    this process's `Ranks` and the device to build its env on; otherwise a single process and `device` unchanged.

    The backend is NCCL when the device is CUDA (``"auto"`` with CUDA present, or ``"cuda"``), with one device per
    local rank (``cuda:LOCAL_RANK``); gloo on the CPU. A process group initialised before is used as it is.
    `ValueError` for ``device="cuda"`` without CUDA, or more local ranks than CUDA devices."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not (dist.is_available() and dist.is_initialized()):
        return Ranks(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} has no CUDA device ({torch.cuda.device_count()} visible): run "
                             "at most one process per device")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    elif device == "auto":
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=torch.device(device) if cuda else None)
    return Ranks.current(), device


def shut_down(finished: bool) -> None:
    """End this process's part in the default process group (a no-op without one).

    `finished`: whether this rank's work ended normally. Then every rank first meets at a barrier, so no rank tears
    down its connections while a peer is still completing the last collective (gloo may otherwise abort the peer at
    exit: "terminate called without an active exception"). After an error there is no barrier (the peers may be
    gone); the group is destroyed at once."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()
