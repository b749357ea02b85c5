"""One rank of the data-parallel tests (tests/agents/test_distributed.py and test_fsdp.py start W of them with
`launch`, one thread each):

    RANK=r WORLD_SIZE=W MASTER_ADDR=… MASTER_PORT=… python distributed_worker.py CASE FOLDER

Reads ``FOLDER/job.json`` (what to run: agents by name, their config and env arguments, ``"fsdp": true`` to shard
them) and writes its results under FOLDER with its rank in the name. Cases:

* ``exact``: one update of each agent, on this rank's share of the episodes in ``FOLDER/episodes.json`` (DPO: on
  its share of the next batch of pairs; ``"poison_rank": r`` makes rank r's first reward NaN); writes the gradient
  of every optimizer step and the parameters after (whole, gathered under FSDP), and the numbers of parameter and
  Adam-moment elements this rank holds.
* ``straight``: 4 updates of each agent with real rollouts (β, this rank's KLs and prompts, the metrics after
  each, the parameters' digest), then 2 updates of a fresh one and a checkpoint.
* ``resume``: each checkpoint loaded (in this fresh process; ``"load_fsdp"`` overrides ``"fsdp"``, ``"checkpoint"``
  names another agent's) and 2 updates.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import gymnasium as gym
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import rlhf_env  # noqa: F401  (registers RLHF-v0)
from agents.distributed import shut_down
from agents.dpo import DPO, DPOConfig
from agents.ppo import PPO, PPOConfig
from agents.reinforce import Reinforce, ReinforceConfig
from agents.rollout import Episodes

AGENTS = {"ppo": (PPO, PPOConfig), "reinforce": (Reinforce, ReinforceConfig), "dpo": (DPO, DPOConfig)}
ROOT = Path(__file__).resolve().parents[2]


def launch(folder: Path, case: str, job: dict, world_size: int = 2, timeout: float = 300) -> list[dict]:
    """Run `case` of this worker on `world_size` processes; their JSON results, in rank order."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.json").write_text(json.dumps(job))
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    logs = [folder / f"{case}-rank{rank}.log" for rank in range(world_size)]
    processes = []
    try:
        for rank in range(world_size):
            with logs[rank].open("w") as log:  # the child keeps its own copy of the handle
                processes.append(subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), case, str(folder)],
                    env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd=folder, stdout=log,
                    stderr=subprocess.STDOUT))
        for process in processes:
            process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes:  # a rank still running after the timeout hangs: end it (and its peer)
            if process.poll() is None:
                process.kill()
                process.wait()
    failed = [rank for rank, process in enumerate(processes) if process.returncode != 0]
    assert not failed, "\n".join(f"rank {rank}:\n{logs[rank].read_text()[-3000:]}" for rank in failed)
    return [json.loads((folder / f"{case}-rank{rank}.json").read_text()) for rank in range(world_size)]


def build(spec: dict, load: str | None = None):
    """The agent of `spec`: ``{"agent", "env" (make_vec's arguments; "lora": LoraConfig's), "config"}``, plus
    ``"perturb_rank": r`` to add noise to rank r's policy before the agent is built (the agent must then start
    from rank 0's parameters)."""
    cls, config_cls = AGENTS[spec["agent"]]
    env = dict(spec["env"])
    if "lora" in env:
        import peft

        env["lora"] = peft.LoraConfig(**env["lora"])
    envs = gym.make_vec("RLHF-v0", **env)
    if dist.is_initialized() and spec.get("perturb_rank") == dist.get_rank():
        with torch.no_grad():
            for p in envs.unwrapped.policy.parameters():
                p.add_(0.01 * torch.randn_like(p))
    fsdp = spec.get("fsdp", False)
    if load is not None:
        return cls.load(load, envs, progress=False, fsdp=spec.get("load_fsdp", fsdp))
    return cls(envs, config_cls(**spec["config"]), progress=False, fsdp=fsdp)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` whole: an FSDP shard gathered (a collective: every rank calls it, in the same order)."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()


def trained(agent) -> torch.Tensor:
    return torch.cat([whole(p).reshape(-1) for p in agent.params]).clone()


def digest(agent) -> str:
    module = getattr(agent, "model", None) or agent.lm
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(whole(tensor).cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def held(agent) -> dict:
    """How many elements of the trained parameters and of Adam's moments this rank holds, and how many the model
    has."""
    local = [p.to_local() if isinstance(p, DTensor) else p for p in agent.params]
    moments = [value.to_local() if isinstance(value, DTensor) else value for slots in agent.optimizer.state.values()
               for name, value in slots.items() if name != "step"]
    return {"parameters": sum(p.numel() for p in local), "moments": sum(m.numel() for m in moments),
            "model": sum(p.numel() for p in agent.params)}


def record_steps(agent) -> list[torch.Tensor]:
    """The gradient each optimizer step is taken with (after the all-reduce and the clip), flattened."""
    gradients, step = [], agent.optimizer.step

    def recording_step(*args, **kwargs):
        gradients.append(torch.cat([(torch.zeros(p.shape) if p.grad is None else whole(p.grad)).reshape(-1)
                                    for p in agent.params]).clone())
        return step(*args, **kwargs)

    agent.optimizer.step = recording_step
    return gradients


def comparable(metrics: dict) -> dict:
    """The metrics an exact rerun reproduces: all but wall times."""
    return {k: v for k, v in metrics.items()
            if not k.startswith("time/") or k in ("time/timesteps", "time/updates", "time/episodes")}


def exact(folder: Path, job: dict, rank: int, world_size: int) -> None:
    batch = json.loads((folder / "episodes.json").read_text())
    share = len(batch["responses"]) // world_size
    mine = Episodes(**{f.name: batch[f.name][rank * share: (rank + 1) * share] for f in fields(Episodes)
                       if isinstance(batch[f.name], list)},
                    tokens=batch["tokens"] // world_size)
    results = {}
    for name, spec in job["agents"].items():
        agent = build(spec)
        gradients = record_steps(agent)
        given = mine
        if spec.get("poison_rank") == rank:  # a NaN reward on this rank only: its loss is not finite
            given = Episodes(**{**vars(mine), "rewards": [[float("nan")] * len(mine.rewards[0]), *mine.rewards[1:]]})
        metrics = agent.update() if spec["agent"] == "dpo" else agent.update(episodes=given)
        torch.save({"gradients": gradients, "parameters": trained(agent)}, folder / f"{name}-rank{rank}.pt")
        results[name] = {"metrics": comparable(metrics), "moving_average": getattr(agent, "moving_average", None),
                         "held": held(agent)}
    (folder / f"exact-rank{rank}.json").write_text(json.dumps(results))


def straight(folder: Path, job: dict, rank: int, world_size: int) -> None:
    """4 updates of each agent with real rollouts (β, this rank's KLs and prompts after each), then 2 updates of a
    fresh one, saved."""
    import agents.common

    results, seen, real = {}, [], agents.common.collect_episodes

    def recording(*args, **kwargs):  # this rank's episodes, as the rollouts collect them
        seen.append(real(*args, **kwargs))
        return seen[-1]

    for name, spec in job["agents"].items():
        agent = build(spec)
        agents.common.collect_episodes = recording
        try:
            updates = []
            for _ in range(4):
                seen.clear()
                metrics = agent.update()
                updates.append({"beta": agent.world.beta, "metrics": comparable(metrics),
                                "kls": [kl for e in seen for kl in e.kls],
                                "prompts": [p for e in seen for p in e.prompts]})
        finally:
            agents.common.collect_episodes = real
        results[name] = {"updates": updates, "digest": digest(agent), "beta": agent.world.beta}
        first = build(spec)
        for _ in range(2):
            first.update()
        first.save(folder / f"{name}-checkpoint")
        results[name]["saved_digest"] = digest(first)
    (folder / f"straight-rank{rank}.json").write_text(json.dumps(results))


def resume(folder: Path, job: dict, rank: int, world_size: int) -> None:
    results = {}
    for name, spec in job["agents"].items():
        agent = build(spec, load=str(folder / f"{spec.get('checkpoint', name)}-checkpoint"))
        loaded = digest(agent)
        metrics = [comparable(agent.update()) for _ in range(2)]
        results[name] = {"metrics": metrics, "digest": digest(agent), "beta": agent.world.beta,
                         "loaded_digest": loaded}
    (folder / f"resume-rank{rank}.json").write_text(json.dumps(results))


CASES = {"exact": exact, "straight": straight, "resume": resume}


def main() -> None:
    torch.set_num_threads(1)
    case, folder = sys.argv[1], Path(sys.argv[2])
    job = json.loads((folder / "job.json").read_text())
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    finished = False
    try:
        CASES[case](folder, job, dist.get_rank(), dist.get_world_size())
        finished = True
    finally:
        shut_down(finished)


if __name__ == "__main__":
    main()
