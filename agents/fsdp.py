"""Sharded data parallelism with FSDP2 (`torch.distributed.fsdp.fully_shard`): each of the W ranks holds 1/W of the
trained parameters, their gradients and Adam's moments, for policies whose training state does not fit one device.

Switched on when an agent is built: ``Reinforce(envs, config, fsdp=True)`` (``PPO``, ``DPO`` alike; ``--fsdp`` on
the command line), under an initialised process group (``torchrun``; `FSDPNeedsProcessGroup` otherwise). Everything
else is data-parallel training as `agents.distributed` describes it; what changes:

* **Units.** Each transformers model the agent trains (π; PPO's separate critic trunk) is wrapped block by block
  (the classes its ``_no_split_modules`` names, the layers transformers' own FSDP integration wraps) and then as a
  whole; any other trained module (a value head) is a unit of its own. The models are whole and equal on every
  rank before they are cut (`agents.common.check_ranks_agree` copies rank 0's first).
* **The update is the same update.** Every loss is normalised by the whole batch's count as before; FSDP's
  reduce-scatter replaces the gradient all-reduce and is set to *sum* (``set_gradient_divide_factor(1.0)`` with
  ``set_force_sum_reduction_for_comms``; FSDP averages over the ranks by default), so each rank holds its slice
  of the whole batch's gradient. The norm clip (``clip_grad_norm_`` over the sharded gradients, DTensors) takes
  the global norm, and Adam steps each slice.
* **Lockstep.** Each forward through a unit all-gathers its parameters and each backward reduce-scatters its
  gradients, collectives every rank must join. So training forwards run through the models' own ``forward``
  (the ``"hf"`` backend: the lean GPT-2 path reads parameters directly and would bypass FSDP's hooks), a rank
  whose share of a PPO minibatch has fewer micro-batches runs zero-weighted ones, and a rank whose loss is not
  finite still runs its backward passes (the step is then skipped on every rank).
* **Decoding** gathers the full parameters once per rollout (`Sharded.full_parameters`): every rank all-gathers
  every unit, the env decodes on whole weights with its usual backend and no collective per token, and the
  shards return afterwards. The alternative, FSDP's own forward with an all-gather per unit per token, cannot
  even line up: the ranks' rollouts end after different numbers of tokens (and it measured slower, see
  docs/scaling.md). π is whole on each rank during a rollout; π_ref and the reward model, frozen and held by the
  env, are never sharded.
* **Checkpoints** are the unsharded format (`agents.checkpoint`): every rank joins the gathers of each tensor
  (`full_tensors`), rank 0 writes them; a load cuts each rank's shard from the full tensors (`shard_like`). So a
  checkpoint of an FSDP run resumes with or without FSDP on as many ranks as saved it.
* **Refused** (`FSDPIncompatible`): a LoRA policy, whose frozen base is also the env's reference (`AdaptersOff`)
  and would be cut under it; its trained state is a few MiB, which data parallelism without FSDP already fits.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import PreTrainedModel

from rlhf_env.lora import is_peft_model


class FSDPNeedsProcessGroup(RuntimeError):
    """``fsdp=True`` without an initialised `torch.distributed` process group (run under torchrun)."""


class FSDPIncompatible(ValueError):
    """``fsdp=True`` with a setting FSDP cannot shard (a LoRA policy)."""


def check_shardable(world) -> None:
    """`FSDPIncompatible` or `FSDPNeedsProcessGroup` unless the env's policy can be sharded here (before an agent
    builds anything)."""
    if is_peft_model(world.policy):
        raise FSDPIncompatible("fsdp=True cannot shard a LoRA policy: its frozen base is also the env's reference "
                               "(the adapters switched off), which the env runs whole at every token; train LoRA "
                               "with plain data parallelism (fsdp=False): its trained state is a few MiB")
    if not (dist.is_available() and dist.is_initialized()):
        raise FSDPNeedsProcessGroup("fsdp=True shards the model over the ranks of a torch.distributed process group, "
                                    "and none is initialised: run under torchrun (torchrun --nproc_per_node W -m "
                                    "agents.reinforce --fsdp ...) or call init_process_group first")


def _units(module: nn.Module) -> list[nn.Module]:
    """The modules `module` is cut into, each one a root (a unit not inside another): the transformers models it
    holds and its other children with parameters (PPO's value head); `module` itself if it is a model or a leaf."""
    if isinstance(module, PreTrainedModel) or not list(module.children()):
        return [module]
    return [unit for child in module.children() if next(child.parameters(), None) is not None
            for unit in _units(child)]


class Sharded:
    """The FSDP2 units of one agent's trained `module` (the policy, or `agents.policy.ActorCritic`), cut over the
    `world_size` ranks of the default process group on `device`'s type (gloo on the CPU, NCCL on CUDA).

    Every parameter of `module` becomes a DTensor holding this rank's slice; ``module.parameters()`` then lists the
    sharded ones (build the optimizer after this)."""

    def __init__(self, module: nn.Module, device: torch.device, world_size: int):
        mesh = init_device_mesh(device.type, (world_size,))
        self.roots = _units(module)
        self.blocks = []
        for root in self.roots:
            names = set(root._no_split_modules or ()) if isinstance(root, PreTrainedModel) else set()
            self.blocks += [m for m in root.modules() if type(m).__name__ in names]
        for block in self.blocks:  # each block all-gathered for its forward, freed after it
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        for root in self.roots:  # what is left (embeddings, final norm, head): kept whole from forward to backward
            fully_shard(root, mesh=mesh, reshard_after_forward=False)
        self.units: list[FSDPModule] = [*self.blocks, *self.roots]
        for unit in self.units:  # a plain sum over the ranks (the losses are normalised globally): no division,
            unit.set_gradient_divide_factor(1.0)  # and a SUM reduce-scatter, not NCCL's PREMUL_SUM (gloo has none)
            unit.set_force_sum_reduction_for_comms(True)
        whole = [name for name, p in module.named_parameters() if not isinstance(p, DTensor)]
        if whole:
            raise FSDPIncompatible(f"fsdp=True left parameters of {type(module).__name__} whole: {whole[:3]}")

    @contextlib.contextmanager
    def full_parameters(self):
        """Every unit's parameters whole on this rank inside the block (one all-gather per unit, on entering: every
        rank must enter, in the same order), and no collective in the forwards run there: the env's rollout, the
        held-out evaluation, PPO's no-grad forward of the old log-probs. The shards return on leaving."""
        for unit in self.units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in self.units:
                unit.reshard()
            for block in self.blocks:
                block.set_reshard_after_forward(True, recurse=False)


@torch.no_grad()
def full_tensors(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """`tensors` whole, on the CPU: each DTensor gathered (a collective: every rank passes the same names in the
    same order), the rest as they are; returned where `keep` (rank 0, which writes), an empty dict elsewhere. A
    tensor listed under two names (tied embeddings, ``state_dict(keep_vars=True)``) is gathered once and stays one
    tensor, so the writer sees it tied."""
    gathered: dict[int, torch.Tensor] = {}
    out = {}
    for name, tensor in tensors.items():
        if id(tensor) not in gathered:
            whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            gathered[id(tensor)] = whole.detach().cpu() if keep else None
        if keep:
            out[name] = gathered[id(tensor)]
    return out


def shard_like(full: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`full` (whole tensors, the same on every rank) cut as the tensors of `like` with the same names are: this
    rank's slice as a DTensor where `like`'s is one (no communication), the tensor itself elsewhere."""
    out = {}
    for name, tensor in full.items():
        model = like[name]
        if isinstance(model, DTensor):
            tensor = distribute_tensor(tensor.to(model.device, model.dtype), model.device_mesh, model.placements,
                                       src_data_rank=None)
        out[name] = tensor
    return out
