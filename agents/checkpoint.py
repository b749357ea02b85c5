"""An agent's checkpoint on disk: safetensors for every tensor, JSON for everything else (never pickle), written
all at once and checked all at once.

A checkpoint directory holds::

    policy/                      the acting policy (`save_pretrained`, safetensors); for a LoRA policy only its
                                 adapter, in PEFT's format (adapter_model.safetensors, adapter_config.json)
    agent.safetensors            the agent's own tensors (critic, value head, DPO's order of the pairs)
    training_state.safetensors   optimizer moments, the torch RNG state (of each rank: rng/torch_generator/<r>),
                                 and that of each reward function with one (``random_state()``, e.g. a direct
                                 RLAIF reward's reference sampler: rng/reward/<name>[/<r>])
    training_state.json          algorithm, config, counters, KL controller, numpy RNG, the env it was trained in,
                                 the number of processes (world_size) and each rank's numpy RNG and rows
    manifest.json                written last: the sha256 and size of every other file

**Data-parallel runs** (`agents.distributed`): every rank calls ``save`` (each one's random streams are gathered);
rank 0 writes the one checkpoint, which holds the shared state (policy, optimizer, KL controller, counters, the
numpy stream the ranks share) and every rank's own streams. An error while rank 0 writes is raised on every rank
(`agents.distributed.RankFailed` on the others). Every rank loads the same folder (it must be visible to each one)
and takes its own streams: a resume with the same number of processes is exact; another number is refused with
`agents.distributed.WorldSizeMismatch` (the ranks' streams cannot be redistributed).

**FSDP runs** (`agents.fsdp`) write the same format: every rank joins the gather of each sharded tensor (policy,
the agent's own tensors, Adam's moments) and rank 0 writes them whole. Loading cuts each rank's shard from the
full tensors. So a checkpoint resumes with or without FSDP, on as many ranks as saved it.

**Saving** fills a temporary sibling directory and swaps it into place in one step (`rlhf_env.files`), so a save
killed at any point leaves the previous checkpoint or the new one, never a mix. A folder that is neither missing,
empty nor a checkpoint is refused, never overwritten.

**Loading** is check-then-change: `read_checkpoint` verifies every file against the manifest and compares the
env the checkpoint was trained in (`env_settings`: task, reward, reference, tokenizer, KL settings, sampling, a
LoRA policy's adapter settings and base) with
the env it is loaded into; `restore_agent` checks every tensor's shape against the agent before it writes
anything. A refused load raises `ValueError` (naming the file or the setting) and leaves the env and the agent
exactly as they were. Differences that do not change the training problem (device, number of rows, backend, the
weights of several rewards, which the env keeps) are allowed and logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from agents.distributed import Ranks, WorldSizeMismatch
from agents.fsdp import full_tensors, shard_like
from rlhf_env.files import MANIFEST, atomic_directory, fault_point, refuse_foreign, verified_snapshot, write_manifest
from rlhf_env.lora import AdaptersOff, adapter_settings, adapter_state_dict, is_peft_model, load_adapter_state_dict
from rlhf_env.models import load_causal_lm, quiet_loading
from rlhf_env.reward import callable_name

log = logging.getLogger(__name__)

FORMAT = "rlhf-gym agent checkpoint"
AGENT_FILE = "agent.safetensors"
TENSORS_FILE = "training_state.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"  # PEFT's names, in policy/ for a LoRA policy
STATE_FILE = "training_state.json"
COUNTERS = ("num_timesteps", "num_updates", "num_episodes")
# Env settings that define the training problem: a checkpoint only resumes in an env that matches them.
REQUIRED = ("task", "kl_mode", "kl_estimator", "temperature", "max_new_tokens", "missing_eos_penalty",
            "nonfinite_reward", "reward", "reference", "tokenizer", "kl_controller", "lora", "end_of_turn")


# ---------------------------------------------------------------- identities
def state_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes): equal iff the weights are equal."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _callable_name(fn) -> str:
    """A reward function's module and name (`rlhf_env.reward.callable_name`), as its identity in a checkpoint."""
    return f"{getattr(fn, '__module__', None) or type(fn).__module__}.{callable_name(fn)}"


def lora_settings(world) -> dict | None:
    """None for a full policy; for a LoRA policy, its adapter's settings (`rlhf_env.lora.adapter_settings`) and its
    base: ``"reference"`` when the reference is that base with the adapters off, else the base's state digest (a
    checkpoint holds only the adapter, so it must resume on the same base)."""
    policy = world.policy
    if not is_peft_model(policy):
        return None
    shared = isinstance(world.reference, AdaptersOff) and world.reference.policy is policy
    return {"adapter": adapter_settings(policy), "base": "reference" if shared else state_digest(AdaptersOff(policy))}


def policy_state(lm) -> dict[str, torch.Tensor]:
    """What a checkpoint saves of the policy: its state dict, or a LoRA policy's adapter weights only."""
    return adapter_state_dict(lm) if is_peft_model(lm) else lm.state_dict()


def env_settings(world) -> dict:
    """What a checkpoint records of the env it was trained in (JSON): the `REQUIRED` settings, which must match on
    load, and the row count, device, backends and reward weights, which may differ (logged).

    With several rewards (``rewards=``) the ``reward`` setting lists each one by name with its identity (a reward
    model's state digest, a function's qualified name): a load into an env with other rewards is refused. Their
    weights are meant to change during training (weight-conditioned policies), so other weights are allowed and
    logged, and the env keeps its own: a checkpoint never sets the env's weights."""
    tokenizer = world.tokenizer
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    if world.named_rewards:  # several rewards: each one's identity, by name (their weights may change)
        reward = {"components": {source.name: {"reward_fn": _callable_name(source.fn)} if source.fn is not None
                                 else {"reward_model_sha256": state_digest(source.model)}
                                 for source in world.reward_sources}}
    elif world.reward_fn is not None:
        reward = {"reward_fn": _callable_name(world.reward_fn)}
    else:
        reward = {"reward_model_sha256": state_digest(world.reward_model)}
    controller = world.kl_controller.state_dict()
    if controller["kind"] == "adaptive":
        controller.pop("beta")  # moves during training; the checkpoint's current β is restored
    return {
        "task": world.task.name, "kl_mode": world.kl_mode, "kl_estimator": world.kl_estimator,
        "temperature": world.temperature, "max_new_tokens": world.max_new_tokens,
        "missing_eos_penalty": world.missing_eos_penalty, "nonfinite_reward": world.nonfinite_reward,
        "reward": reward, "reference": state_digest(world.reference),
        "tokenizer": hashlib.sha256((vocab + specials).encode("utf-8")).hexdigest(), "kl_controller": controller,
        "lora": lora_settings(world),
        "end_of_turn": world.end_of_turn_id,  # None (EOS alone) in checkpoints from before chat prompts
        "device": str(world.device), "backends": dict(world.backends),
        "reward_weights": world.reward_weights if world.named_rewards else None,
    }


def _check_env(saved: dict, world, num_envs: int, directory: Path) -> None:
    """`ValueError` listing every required setting in which `world` differs from the checkpoint's env; the allowed
    differences are logged."""
    current = env_settings(world) | {"num_envs": num_envs}
    differ = [f"{key}: checkpoint {saved.get(key)!r}, env {current[key]!r}" for key in REQUIRED
              if saved.get(key) != current[key]]
    if differ:
        raise ValueError(f"{directory} was trained in another env; build the env as the original run did. "
                         "Differences: " + "; ".join(differ))
    for key in ("num_envs", "device", "backends", "reward_weights"):
        if saved.get(key) != current[key]:
            log.warning("resuming %s with %s %r (saved with %r): the run continues, but not bit for bit as the "
                        "uninterrupted one would", directory, key, current[key], saved.get(key))


# ---------------------------------------------------------------- saving
def _checkpoint_files(directory: Path) -> set[str] | None:
    """The files a previous save wrote into `directory` (its manifest and what it lists), None if it holds no
    checkpoint manifest."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {MANIFEST, *files} if manifest.get("format") == FORMAT and isinstance(files, dict) else None


def random_rewards(world) -> dict[str, object]:
    """The world's reward functions that carry a random state (``random_state()`` and ``set_random_state(tensor)``,
    as `rlhf_env.judge_reward.JudgeReward` does), by reward name: checkpoints save and restore them."""
    return {source.name: source.fn for source in world.reward_sources
            if callable(getattr(source.fn, "random_state", None))
            and callable(getattr(source.fn, "set_random_state", None))}


def save_checkpoint(agent, directory: str | Path, algorithm: str, tensors: dict[str, torch.Tensor],
                    state: dict | None = None) -> None:
    """Write `agent`'s policy, its own `tensors`, optimizer, RNG states, KL controller, counters, config, the env's
    settings and `state` (JSON) as one checkpoint, replacing any previous one at `directory` in one step.

    In a data-parallel run every rank calls it (a collective); rank 0 writes, with every rank's random streams."""
    ranks = agent.ranks
    streams = ranks.gather({"numpy_rng": agent.rng.bit_generator.state, "torch_generator": agent.generator.get_state(),
                            "num_envs": agent.envs.num_envs,  # every rank's own random streams and rows
                            "rewards": {name: fn.random_state() for name, fn in random_rewards(agent.world).items()}})
    policy = optimizer = None
    if agent.sharded is not None:  # FSDP: every rank joins each tensor's gather; rank 0 keeps them whole
        keep = ranks.is_main
        policy = full_tensors(agent.lm.state_dict(keep_vars=True), keep)  # tied weights stay one tensor
        tensors = full_tensors(tensors, keep)
        optimizer = agent.optimizer.state_dict()
        optimizer["state"] = {index: full_tensors(slots, keep) for index, slots in optimizer["state"].items()}
    if ranks.is_main:
        _write_checkpoint(agent, Path(directory), algorithm, tensors, state, streams, policy, optimizer)
    else:
        ranks.agreed(lambda: None)  # rank 0's outcome: its error, if it had one, is raised here too


def _write_checkpoint(agent, directory: Path, algorithm: str, tensors: dict[str, torch.Tensor], state: dict | None,
                      streams: list[dict], policy: dict[str, torch.Tensor] | None = None,
                      optimizer: dict | None = None) -> None:
    """Rank 0's part of `save_checkpoint` (all of it in one process), `streams` holding each rank's own; under
    FSDP `policy` and `optimizer` are the gathered state dicts of the policy and the optimizer (else read here)."""
    from dataclasses import asdict

    def write() -> None:
        refuse_foreign(directory, _checkpoint_files(directory) if directory.is_dir() else None,
                       "an agent checkpoint")
        optim = agent.optimizer.state_dict() if optimizer is None else optimizer
        meta = {"algorithm": algorithm, "config": asdict(agent.config), **{c: getattr(agent, c) for c in COUNTERS},
                "kl_controller": agent.world.kl_controller.state_dict(), **(state or {}),
                "env": env_settings(agent.world) | {"num_envs": agent.envs.num_envs},
                "optimizer_param_groups": optim["param_groups"], "world_size": len(streams)}
        if len(streams) == 1:  # one process: one numpy stream, shared and own
            state_tensors = {"rng/torch_generator": streams[0]["torch_generator"]}
            state_tensors |= {f"rng/reward/{name}": value for name, value in streams[0]["rewards"].items()}
            meta["numpy_rng"] = streams[0]["numpy_rng"]
        else:
            state_tensors = {f"rng/torch_generator/{r}": s["torch_generator"] for r, s in enumerate(streams)}
            state_tensors |= {f"rng/reward/{name}/{r}": value for r, s in enumerate(streams)
                              for name, value in s["rewards"].items()}
            meta["numpy_rng"] = agent.shared_rng.bit_generator.state
            meta["ranks"] = [{"numpy_rng": s["numpy_rng"], "num_envs": s["num_envs"]} for s in streams]
        for index, slots in optim["state"].items():
            for name, value in slots.items():
                state_tensors[f"optimizer/{index}/{name}"] = torch.as_tensor(value)
        _write_files(agent, directory, algorithm, tensors, state_tensors, meta, policy)

    agent.ranks.agreed(write)


def _write_files(agent, directory: Path, algorithm: str, tensors: dict[str, torch.Tensor],
                 state_tensors: dict[str, torch.Tensor], meta: dict,
                 policy: dict[str, torch.Tensor] | None = None) -> None:
    text = json.dumps(meta, indent=2)  # serialised first: an unserialisable state writes nothing
    with atomic_directory(directory) as tmp:
        with quiet_loading():  # transformers' per-shard progress bar, at every checkpoint
            # A PeftModel saves its adapter only; `policy` (FSDP: gathered) replaces the model's own state dict.
            agent.lm.save_pretrained(tmp / "policy", safe_serialization=True, state_dict=policy)
        fault_point("policy saved")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / AGENT_FILE)
        fault_point("agent tensors saved")
        save_file({k: v.detach().cpu().contiguous() for k, v in state_tensors.items()}, tmp / TENSORS_FILE)
        fault_point("training tensors saved")
        (tmp / STATE_FILE).write_text(text)
        fault_point("training state saved")
        write_manifest(tmp, {"format": FORMAT, "algorithm": algorithm})


# ---------------------------------------------------------------- loading
@dataclass
class Checkpoint:
    """A checkpoint read from disk and verified (`read_checkpoint`), not yet applied to anything."""

    directory: Path
    meta: dict  # training_state.json
    policy: dict[str, torch.Tensor]  # the policy's state dict (a LoRA policy: its adapter's, `policy_state`)
    tensors: dict[str, torch.Tensor]  # the agent's own (agent.safetensors)
    state_tensors: dict[str, torch.Tensor]  # optimizer moments and the torch RNG state

    @property
    def config(self) -> dict:
        return self.meta["config"]


def checkpoint_config(directory: str | Path, algorithm: str) -> dict:
    """The config a checkpoint of `algorithm` was saved with (from its JSON, unverified: for reading only)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise ValueError(f"{directory} is not a checkpoint (no {STATE_FILE})")
    meta = json.loads(path.read_text())
    if meta.get("algorithm") != algorithm:
        raise ValueError(f"{directory} is a {meta.get('algorithm')!r} checkpoint, not {algorithm!r}")
    return meta["config"]


def read_checkpoint(directory: str | Path, algorithm: str, envs, world_size: int = 1) -> Checkpoint:
    """Read and verify the checkpoint at `directory` for `algorithm`, to be loaded into the vector env `envs` by
    `world_size` processes.

    Raises `ValueError` for a missing, incomplete or damaged file (sha256 against the manifest), a checkpoint of
    another algorithm or format, or an env that differs in a `REQUIRED` setting; `WorldSizeMismatch` (a
    `ValueError`) for a checkpoint saved by another number of processes. Changes nothing.
    """
    directory = Path(directory)
    with verified_snapshot(directory, "checkpoint") as (copy, manifest):
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{directory} is not an rlhf-gym agent checkpoint (its {MANIFEST} has format "
                             f"{manifest.get('format')!r})")
        for name in (STATE_FILE, TENSORS_FILE, AGENT_FILE):
            if name not in manifest["files"]:
                raise ValueError(f"checkpoint {directory} is incomplete: its manifest lists no {name}")
        try:
            meta = json.loads((copy / STATE_FILE).read_text())
        except ValueError as error:
            raise ValueError(f"{directory / STATE_FILE} is not valid JSON: {error}") from None
        if not isinstance(meta, dict) or meta.get("algorithm") != algorithm:
            found = meta.get("algorithm") if isinstance(meta, dict) else None
            raise ValueError(f"{directory} is a {found!r} checkpoint, not {algorithm!r}")
        missing = [k for k in ("config", "kl_controller", "env", "optimizer_param_groups", "numpy_rng", *COUNTERS)
                   if k not in meta]
        if missing:
            raise ValueError(f"{directory / STATE_FILE} lacks {', '.join(missing)}")
        saved_size = meta.get("world_size", 1)  # checkpoints from before data-parallel runs: one process
        if saved_size != world_size:
            raise WorldSizeMismatch(f"{directory} was saved by {saved_size} process(es), each with its own random "
                                    f"streams; resume it with {saved_size} (torchrun --nproc_per_node "
                                    f"{saved_size}), not {world_size}")
        _check_env(meta["env"], envs.world, envs.num_envs, directory)
        if meta["env"].get("lora") is None:
            policy = load_causal_lm(copy / "policy", device="cpu").state_dict()
        else:  # an adapter only: the env's base is the checkpoint's (checked above)
            if f"policy/{ADAPTER_FILE}" not in manifest["files"]:
                raise ValueError(f"checkpoint {directory} is incomplete: its manifest lists no policy/{ADAPTER_FILE}")
            policy = load_file(copy / "policy" / ADAPTER_FILE)
        return Checkpoint(directory, meta, policy, load_file(copy / AGENT_FILE), load_file(copy / TENSORS_FILE))


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}


def _compare(what: str, saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], directory: Path) -> None:
    saved_shapes, expected_shapes = _shapes(saved), _shapes(expected)
    if saved_shapes != expected_shapes:
        differ = sorted(k for k in set(saved_shapes) | set(expected_shapes)
                        if saved_shapes.get(k) != expected_shapes.get(k))
        raise ValueError(f"the {what} in {directory} does not fit this agent: {len(differ)} tensors differ in name, "
                         f"shape or dtype, e.g. {differ[:3]}")


def _optimizer_state(checkpoint: Checkpoint, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state dict of `checkpoint`, checked against `optimizer`'s parameters."""
    groups = checkpoint.meta["optimizer_param_groups"]
    current = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in current]:
        raise ValueError(f"the optimizer in {checkpoint.directory} has other parameters than this agent's")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    slots: dict[int, dict] = {}
    for key, value in checkpoint.state_tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/")
            index = int(index)
            if not 0 <= index < len(params) or (value.ndim > 0 and value.shape != params[index].shape):
                raise ValueError(f"the optimizer state {key} in {checkpoint.directory} does not fit this agent's "
                                 "parameters")
            slots.setdefault(index, {})[name] = value
    return {"state": slots, "param_groups": groups}


def restore_agent(agent, checkpoint: Checkpoint, own: dict[str, torch.Tensor]) -> Callable[[], None]:
    """Check a verified `checkpoint` against a freshly built `agent` whose own tensors look like `own` (names,
    shapes, dtypes) and return the function that writes it (policy, optimizer, RNGs, KL controller, counters).

    Every check runs here (`ValueError` naming what does not fit); the returned function refuses nothing, so a
    caller that makes its own checks in between still changes nothing until it calls it. The caller then loads
    ``checkpoint.tensors`` into its own modules (already checked against `own`; under FSDP, this rank's shards of
    them, cut here)."""
    directory = checkpoint.directory
    _compare("policy", checkpoint.policy, policy_state(agent.lm), directory)
    _compare("agent's own tensors", checkpoint.tensors, own, directory)
    optimizer_state = _optimizer_state(checkpoint, agent.optimizer)
    policy = checkpoint.policy
    if agent.sharded is not None:  # FSDP: the full tensors cut as this rank's shards are (no communication)
        policy = shard_like(policy, policy_state(agent.lm))
        checkpoint.tensors = shard_like(checkpoint.tensors, own)
        params = [p for group in agent.optimizer.param_groups for p in group["params"]]
        optimizer_state["state"] = {index: shard_like(slots, {name: params[index] if value.ndim > 0 else value
                                                              for name, value in slots.items()})
                                    for index, slots in optimizer_state["state"].items()}
    ranks = agent.ranks
    shared_state = checkpoint.meta["numpy_rng"]  # one process: its only numpy stream
    if ranks.single:
        generator_key, numpy_state = "rng/torch_generator", shared_state
    else:  # this rank's own streams
        generator_key = f"rng/torch_generator/{ranks.rank}"
        rank_states = checkpoint.meta.get("ranks")
        if not isinstance(rank_states, list) or len(rank_states) != ranks.world_size:
            raise ValueError(f"{directory / STATE_FILE} holds no random streams for {ranks.world_size} ranks")
        numpy_state = rank_states[ranks.rank].get("numpy_rng", {})
    generator_state = checkpoint.state_tensors.get(generator_key)
    if generator_state is None or generator_state.shape != agent.generator.get_state().shape:
        raise ValueError(f"{directory / TENSORS_FILE} holds no valid torch RNG state ({generator_key})")
    reward_states = {}
    for name in random_rewards(agent.world):
        key = f"rng/reward/{name}" + ("" if ranks.single else f"/{ranks.rank}")
        if key in checkpoint.state_tensors:
            reward_states[name] = checkpoint.state_tensors[key]
        else:  # a checkpoint written before reward functions' states were saved
            log.warning("%s holds no random state for reward %r (%s): it continues from its current state, so the "
                        "resumed run is not exact", directory / TENSORS_FILE, name, key)
    for state in (numpy_state, shared_state):
        if not isinstance(state, dict) or state.get("bit_generator") != agent.rng.bit_generator.state["bit_generator"]:
            found = state.get("bit_generator") if isinstance(state, dict) else state
            raise ValueError(f"{directory / STATE_FILE}: numpy RNG {found!r} is not this agent's "
                             f"{agent.rng.bit_generator.state['bit_generator']!r}")

    @torch.no_grad()
    def write() -> None:
        if is_peft_model(agent.lm):
            load_adapter_state_dict(agent.lm, policy)
        else:
            agent.lm.load_state_dict(policy)
        agent.optimizer.load_state_dict(optimizer_state)
        agent.generator.set_state(generator_state)
        agent.rng.bit_generator.state = numpy_state
        agent.shared_rng.bit_generator.state = shared_state  # the same generator as agent.rng in one process
        agent.world.kl_controller.load_state_dict(checkpoint.meta["kl_controller"])
        rewards = random_rewards(agent.world)
        for name, state in reward_states.items():
            rewards[name].set_random_state(state)
        for counter in COUNTERS:
            setattr(agent, counter, int(checkpoint.meta[counter]))

    return write


def load_agent(cls, config_cls, algorithm: str, directory: str | Path, env, out_dir, progress: bool, fsdp: bool,
               own: Callable, write_own: Callable):
    """Every agent's ``load``: read and verify the checkpoint (`read_checkpoint`), build the agent with the saved
    config (``config_cls(**saved)``: the config class, or a function that also reads older checkpoints' fields;
    sharded with `fsdp`), check everything against it (`restore_agent`, and ``own(agent, checkpoint)`` -> the agent's
    own tensor layout, raising for anything else it refuses), take `out_dir` (its log cut back to the checkpoint's
    update), and only then write: the shared state, then ``write_own(agent, checkpoint)``."""
    from agents.metrics import MetricsLogger
    from agents.rollout import unwrap_vector_env

    ranks = Ranks.current()  # every step that may refuse is agreed: a refusal on one rank is raised on all
    checkpoint = ranks.agreed(lambda: read_checkpoint(directory, algorithm, unwrap_vector_env(env), ranks.world_size))
    agent = cls(env, config_cls(**checkpoint.config), progress=progress, fsdp=fsdp)
    write = ranks.agreed(lambda: restore_agent(agent, checkpoint, own(agent, checkpoint)))
    resume_at = (checkpoint.meta["num_updates"], checkpoint.meta["num_timesteps"])
    agent.logger = ranks.agreed(lambda: MetricsLogger(out_dir if ranks.is_main else None, resume_at=resume_at))
    write()
    write_own(agent, checkpoint)
    return agent
