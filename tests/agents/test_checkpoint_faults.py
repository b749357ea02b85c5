"""Checkpoints under faults: a save stopped at any point leaves the old checkpoint or the new one, never a mix; a
refused load changes nothing; a resumed run's log equals an uninterrupted run's."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import gymnasium as gym
import pytest
import torch
from safetensors.torch import save_file

from agents.checkpoint import state_digest
from agents.dpo import DPO, DPOConfig
from agents.metrics import read_history
from agents.ppo import PPO, PPOConfig
from agents.reinforce import Reinforce, ReinforceConfig
from rlhf_env import files
from rlhf_env.files import FolderInUse, FolderLock

CONFIG = PPOConfig(episodes_per_update=8, minibatch_size=4, update_epochs=1)


def make_envs(**kwargs):
    return gym.make_vec("RLHF-v0", num_envs=8, **{"max_new_tokens": 8, "beta": 0.1, **kwargs})


class Killed(BaseException):
    """A simulated SIGKILL: raised at a fault point; the test also disables clean-up, as a kill would."""


def fault_points(save) -> list[str]:
    """The names of the fault points one `save()` passes, in order."""
    seen = []
    files.FAULT_HOOK = seen.append
    try:
        save()
    finally:
        files.FAULT_HOOK = None
    return seen


def killed_at(point: str, occurrence: int, save, monkeypatch) -> None:
    """Run `save` and stop it as a SIGKILL would at the `occurrence`-th pass of `point`: no clean-up runs."""
    count = 0

    def hook(name):
        nonlocal count
        if name == point:
            count += 1
            if count == occurrence:
                raise Killed(name)

    with monkeypatch.context() as patch:
        patch.setattr(files.shutil, "rmtree", lambda *args, **kwargs: None)  # a killed process deletes nothing
        patch.setattr(files, "FAULT_HOOK", hook)
        with pytest.raises(Killed):
            save()


def snapshot(envs) -> dict:
    """Everything of the env that a load could change."""
    world = envs.unwrapped.world
    return {"policy": state_digest(world.policy), "reference": state_digest(world.reference),
            "controller": world.kl_controller.state_dict(), "pending_kls": list(world._kl_batch),
            "rngs": [rng.bit_generator.state for rng in envs.unwrapped._rngs]}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """The folder holding a PPO run's checkpoints after update 1 (``old``) and update 2 (``new``)."""
    root = tmp_path_factory.mktemp("checkpoints")
    agent = PPO(make_envs(), CONFIG, progress=False)
    agent.update()
    agent.save(root / "old")
    agent.update()
    agent.save(root / "new")
    return root


def load_updates_and_policy(directory):
    agent = PPO.load(directory, make_envs(), progress=False)
    return agent.num_updates, state_digest(agent.lm)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_save_killed_at_any_point_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch, exchange):
    if not exchange:  # the portable path: the old directory is moved aside, then the new one moved in
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    agent = PPO(make_envs(), CONFIG, progress=False)
    agent.update()
    agent.save(tmp_path / "ckpt")
    old = (1, state_digest(agent.lm))
    agent.update()
    new = (2, state_digest(agent.lm))
    points = fault_points(lambda: agent.save(tmp_path / "probe"))
    assert len(points) >= 5, points
    for index, point in enumerate(points):
        occurrence = points[: index + 1].count(point)
        killed_at(point, occurrence, lambda: agent.save(tmp_path / "ckpt"), monkeypatch)
        if (tmp_path / "ckpt").exists():
            assert load_updates_and_policy(tmp_path / "ckpt") in (old, new), point
        else:  # killed between the two renames: the old checkpoint waits beside it, and loading says where
            assert not exchange and point == "moved old aside"
            with pytest.raises(ValueError, match=r"interrupted: the previous version is in .*\.ckpt\.old-"):
                PPO.load(tmp_path / "ckpt", make_envs(), progress=False)
            (aside,) = tmp_path.glob(".ckpt.old-*")
            assert load_updates_and_policy(aside) == old
            aside.rename(tmp_path / "ckpt")
        # The next save, over whatever the kill left behind, works and loads.
        agent.save(tmp_path / "ckpt")
        assert load_updates_and_policy(tmp_path / "ckpt") == new


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)
    import gymnasium as gym
    import rlhf_env
    from rlhf_env import files
    from agents.ppo import PPO, PPOConfig
    directory, point = sys.argv[1:]
    agent = PPO(gym.make_vec("RLHF-v0", num_envs=8, max_new_tokens=8, beta=0.1),
                PPOConfig(episodes_per_update=8, minibatch_size=4, update_epochs=1), progress=False)
    agent.update()
    agent.save(directory)
    agent.update()
    files.FAULT_HOOK = lambda name: name == point and os.kill(os.getpid(), signal.SIGKILL)
    agent.save(directory)
""")


@pytest.mark.parametrize("point", ["training tensors saved", "exchanged"])
def test_a_real_sigkill_during_save_leaves_a_complete_checkpoint(tmp_path, point):
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt"), point], cwd=os.getcwd(),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == -signal.SIGKILL
    updates, _ = load_updates_and_policy(tmp_path / "ckpt")
    assert updates == (1 if point == "training tensors saved" else 2)


def test_a_damaged_or_truncated_checkpoint_is_refused_by_name(two_checkpoints, tmp_path):
    root = two_checkpoints

    for name, damage in [("training_state.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])),
                         ("training_state.json", lambda p: p.write_text(p.read_text().replace('"num_updates": 1',
                                                                                               '"num_updates": 9'))),
                         ("agent.safetensors", lambda p: p.unlink())]:
        copy = tmp_path / name
        shutil.copytree(root / "old", copy)
        damage(copy / name)
        envs = make_envs()
        before = snapshot(envs)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            PPO.load(copy, envs, progress=False)
        assert snapshot(envs) == before


@pytest.mark.parametrize("env_kwargs, message", [
    (dict(beta=0.05), "kl_controller"),  # a fixed β of another value is not silently taken over
    (dict(beta=0.1, kl_target=2.0), "kl_controller"),  # fixed-β checkpoint, adaptive-β env
    (dict(max_new_tokens=6), "max_new_tokens"),
    (dict(temperature=0.7), "temperature"),
    (dict(reward_fn=lambda prompts, responses: [0.0] * len(prompts)), "reward"),
    (dict(missing_eos_penalty=1.0), "missing_eos_penalty"),
    (dict(kl_estimator="k3"), "kl_estimator"),
    (dict(end_of_turn="good"), "end_of_turn"),  # episodes would stop at another token
])
def test_a_load_into_another_env_is_refused_before_anything_changes(two_checkpoints, env_kwargs, message):
    root = two_checkpoints
    envs = make_envs(**env_kwargs)
    envs.reset(seed=3)
    before = snapshot(envs)
    with pytest.raises(ValueError, match=f"trained in another env.*{message}"):
        PPO.load(root / "old", envs, progress=False)
    assert snapshot(envs) == before


def test_another_task_with_its_own_reference_is_refused(two_checkpoints):
    root = two_checkpoints
    envs = gym.make_vec("RLHF-v0", task="verbose", num_envs=8, max_new_tokens=8)
    before = snapshot(envs)
    with pytest.raises(ValueError, match="task: checkpoint 'sentiment', env 'verbose'"):
        PPO.load(root / "old", envs, progress=False)
    assert snapshot(envs) == before


def test_a_load_that_does_not_fit_the_agent_changes_nothing(two_checkpoints, tmp_path):
    """A critic of another shape (re-hashed into the manifest, as a hand-made checkpoint would be) is refused after
    the agent is built and before the env's policy is touched."""
    root = two_checkpoints
    shutil.copytree(root / "old", tmp_path / "ckpt")
    save_file({"value_head.weight": torch.zeros(1, 7), "value_head.bias": torch.zeros(1)},
              tmp_path / "ckpt" / "agent.safetensors")
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    files.write_manifest(tmp_path / "ckpt", {k: v for k, v in manifest.items() if k != "files"})
    envs = make_envs()
    before = snapshot(envs)
    with pytest.raises(ValueError, match="does not fit this agent"):
        PPO.load(tmp_path / "ckpt", envs, progress=False)
    assert snapshot(envs) == before


def test_dpo_with_another_beta_is_refused_before_anything_changes(tmp_path, small_pairs):
    config = DPOConfig(batch_size=8, pairs=small_pairs(16), eval_pairs=small_pairs(8, "eval"))
    agent = DPO(make_envs(beta=0.1), config, progress=False)
    agent.update()
    agent.save(tmp_path / "dpo")
    envs = make_envs(beta=0.2)
    before = snapshot(envs)
    with pytest.raises(ValueError, match="kl_controller"):
        DPO.load(tmp_path / "dpo", envs, progress=False)
    assert snapshot(envs) == before


def test_a_load_into_a_folder_another_run_owns_changes_nothing(two_checkpoints, tmp_path):
    root = two_checkpoints
    envs = make_envs()
    before = snapshot(envs)
    with FolderLock(tmp_path / "run"):
        with pytest.raises(FolderInUse):
            PPO.load(root / "old", envs, out_dir=tmp_path / "run", progress=False)
    assert snapshot(envs) == before


def test_save_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    agent = PPO(make_envs(), CONFIG, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("years of work")
    with pytest.raises(ValueError, match="neither empty nor an agent checkpoint.*thesis.txt"):
        agent.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary sibling left either


@pytest.mark.parametrize("cls, config", [
    (PPO, CONFIG),
    (Reinforce, ReinforceConfig(episodes_per_update=8, micro_batch_size=4)),
])
def test_a_resumed_run_logs_what_an_uninterrupted_run_logs(tmp_path, cls, config):
    straight = cls(make_envs(), config, out_dir=tmp_path / "straight", progress=False)
    for _ in range(4):
        straight.update()
    straight.logger.close()
    crashed = cls(make_envs(), config, out_dir=tmp_path / "run", progress=False)
    crashed.update()
    crashed.update()
    crashed.save(tmp_path / "ckpt")
    crashed.update()  # logged, then lost: the process dies before the next checkpoint
    del crashed
    resumed = cls.load(tmp_path / "ckpt", make_envs(), out_dir=tmp_path / "run", progress=False)
    resumed.update()
    resumed.update()
    resumed.logger.close()

    def comparable(path):
        return [{k: v for k, v in h.items() if k in ("time/updates", "time/timesteps") or not k.startswith("time/")}
                for h in read_history(path)]

    assert [h["time/updates"] for h in comparable(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert comparable(tmp_path / "run" / "metrics.jsonl") == comparable(tmp_path / "straight" / "metrics.jsonl")


def test_save_refuses_a_look_alike_and_a_checkpoint_with_a_file_of_yours(two_checkpoints, tmp_path):
    agent = PPO(make_envs(), CONFIG, progress=False)
    fake = tmp_path / "site"
    fake.mkdir()
    for name in ("manifest.json", "training_state.json"):
        (fake / name).write_text("{}")
    (fake / "index.html").write_text("<html>")
    with pytest.raises(ValueError, match="index.html"):
        agent.save(fake)
    shutil.copytree(two_checkpoints / "old", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "NOTES.txt").write_text("mine")
    with pytest.raises(ValueError, match="does not list NOTES.txt"):
        agent.save(tmp_path / "ckpt")
    assert (fake / "index.html").is_file() and (tmp_path / "ckpt" / "NOTES.txt").is_file()


def test_a_save_through_a_link_replaces_the_folder_it_points_to(two_checkpoints, tmp_path):
    shutil.copytree(two_checkpoints / "old", tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    agent = PPO(make_envs(), CONFIG, progress=False)
    agent.update()
    agent.update()
    agent.save(tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert load_updates_and_policy(tmp_path / "real") == (2, state_digest(agent.lm))


def test_a_load_never_mixes_two_versions_swapped_in_while_it_reads(two_checkpoints, tmp_path, monkeypatch):
    """A save that swaps the folder in the middle of a load (here: after the load's first file) makes the load read
    the new version whole, never the old version's counters with the new one's weights."""
    shutil.copytree(two_checkpoints / "old", tmp_path / "ckpt")
    link = files._link_or_copy
    swapped = []

    def swap_after_first(source, destination):
        link(source, destination)
        if not swapped:
            swapped.append(True)
            shutil.copytree(two_checkpoints / "new", tmp_path / "incoming")
            files.replace_directory(tmp_path / "incoming", tmp_path / "ckpt")

    monkeypatch.setattr(files, "_link_or_copy", swap_after_first)
    agent = PPO.load(tmp_path / "ckpt", make_envs(), progress=False)
    monkeypatch.undo()
    assert swapped and (agent.num_updates, state_digest(agent.lm)) == load_updates_and_policy(two_checkpoints / "new")


def test_a_manifest_with_damaged_entries_is_named(two_checkpoints, tmp_path):
    shutil.copytree(two_checkpoints / "old", tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "manifest.json"
    path.write_text(json.dumps({"format": "rlhf-gym agent checkpoint", "files": {"training_state.json": "abc"}}))
    with pytest.raises(ValueError, match="manifest.json is damaged"):
        PPO.load(tmp_path / "ckpt", make_envs(), progress=False)


@pytest.mark.parametrize("out_dir, message", [("", "folder path or None"), (123, "folder path or None"),
                                              ("FILE", "is a file")])
def test_bad_out_dirs_are_named(tmp_path, out_dir, message):
    if out_dir == "FILE":
        out_dir = tmp_path / "file"
        out_dir.write_text("x")
    with pytest.raises(ValueError, match=message):
        PPO(make_envs(), CONFIG, out_dir=out_dir, progress=False)


@pytest.mark.parametrize("total", [-5, float("nan"), 2.5, True])
def test_learn_refuses_a_budget_that_is_not_a_count(total):
    agent = PPO(make_envs(), CONFIG, progress=False)
    with pytest.raises(ValueError, match="total_timesteps"):
        agent.learn(total)


def test_a_refused_load_leaves_the_global_rng_alone(two_checkpoints, tmp_path):
    envs = make_envs()
    state = torch.get_rng_state()
    with FolderLock(tmp_path / "run"), pytest.raises(FolderInUse):
        PPO.load(two_checkpoints / "old", envs, out_dir=tmp_path / "run", progress=False)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_load_reads_one_version_even_if_a_save_swaps_the_folder_after_its_first_read(two_checkpoints, tmp_path,
                                                                                          monkeypatch):
    import agents.checkpoint

    shutil.copytree(two_checkpoints / "old", tmp_path / "ckpt")
    read_policy = agents.checkpoint.load_causal_lm

    def read_then_swap(*args, **kwargs):
        model = read_policy(*args, **kwargs)
        if not (tmp_path / "incoming").exists():
            shutil.copytree(two_checkpoints / "new", tmp_path / "incoming")
            files.replace_directory(tmp_path / "incoming", tmp_path / "ckpt")
        return model

    monkeypatch.setattr(agents.checkpoint, "load_causal_lm", read_then_swap)
    agent = PPO.load(tmp_path / "ckpt", make_envs(), progress=False)
    monkeypatch.undo()
    assert whole_state(agent) == whole_state(PPO.load(two_checkpoints / "old", make_envs(), progress=False))


def whole_state(agent) -> tuple:
    """Counters, policy and critic, and the optimizer's moments of an agent."""
    moments = [v for slots in agent.optimizer.state_dict()["state"].values() for k, v in sorted(slots.items())]
    return agent.num_updates, state_digest(agent.model), [m.sum().item() for m in moments]
