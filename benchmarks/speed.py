"""Seconds per update of our agents next to TRL's trainers on identical tiny models, work and lengths, in one run:
``python -m benchmarks.speed`` (needs ``pip install -e ".[compare]"`` for TRL; prints JSON, ``--out FILE`` saves it).

* ``dpo``: one DPO step on 16 pairs (16-token prompts, responses of ~32 tokens), reference log-probs precomputed
  on both sides (ours always; TRL's ``precompute_ref_log_probs=True``): our `DPO` against TRL's `DPOTrainer`.
* ``rloo``: one RLOO update, 8 prompts × 4 samples, 16-token prompts, up to 32 new tokens, with a reference model
  and a reward model: our `Reinforce` (baseline "rloo") against TRL's `RLOOTrainer`. Both sample from the same
  randomly initialised 0.48M-parameter GPT-2 with a 512-token BPE vocabulary (so responses almost always run the
  full 32 tokens: its EOS probability is ~1/V), score with
  the same reward model (TRL calls it as a reward function on the decoded text, as its API requires) and take one
  Adam step. TRL's gradient (activation) checkpointing, on by default, is turned off (it measured within 3% either way).

* ``grpo``: the RLOO row's work with GRPO's advantages (each return minus its group's mean, divided by the group's
  std): our `Reinforce` (baseline "rloo", ``advantage_norm="group_std"``) against TRL's `GRPOTrainer` (β = 0.05 so
  that it runs the reference model, as we do; one step per batch).
* ``scaling``: our RLOO update and TRL's as the response length grows (16, 64, 256 new tokens on the 0.48M model)
  and as the model grows (~0.5M, ~4M, ~30M parameters at 32 new tokens), a few updates per point.
* ``ppo``: our `PPO` on the RLOO row's work (TRL deleted its PPO): per update the same rollout, then 4 epochs × 2
  minibatches (8 optimizer steps, the default shape) or 1 epoch × 1 minibatch (RLOO's one step), with the value head
  on the shared trunk; reported as the ratio to our RLOO per update (= per sample: both take 32 episodes). Next
  to it TRL's last PPO (``trl.experimental.ppo``, TRL ≤ 1.12, deleted since) in the default shape, when the
  installed TRL has it: it needs its own environment (``pip install "trl==1.12.0"``), as ``[compare]`` pins a
  newer TRL.

What an update includes on each side: sampling (ours: the env's KV-cached policy forward, plus the reference forward
and the per-token KL it pays; TRL: `generate`, then a reference forward over the batch), the reward model, the
advantages and one forward/backward/step. Timings skip warm-up updates and report the median. Each side of each row
runs in a fresh process of its own, which also reports its peak resident memory (``peak_rss_mib``).

Run it alone on the machine (two torch processes on 2 cores slow each other 25–45×).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import git_commit, report
from rlhf_env.files import atomic_write
from rlhf_env.models import load_tokenizer

TRL_HINT = 'TRL is not installed: pip install -e ".[compare]"'


def build_tiny_world(directory: Path, seed: int = 0, vocab_size: int = 512, prompt_tokens: int = 16,
                     n_prompts: int = 2000, shape: dict | None = None, n_positions: int = 64) -> dict:
    """The measurement shape of the TRL comparisons: a byte-level BPE tokenizer with `vocab_size` tokens trained on
    the sentiment corpus, a random 0.48M-parameter GPT-2 policy (also the reference), a random reward model of
    the same size, and a prompts file of `n_prompts` prompts of `prompt_tokens` tokens each. Returns the paths.

    `shape` (``n_embd``, ``n_layer``, ``n_head``) sizes both models instead (see `MODEL_SIZES`); `n_positions` is
    their context (prompt + response)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    from rlhf_env.models import build_policy
    from rlhf_env.pipeline.tokenizer import train_tokenizer
    from rlhf_env.reward_model import RewardModel
    from rlhf_env.tasks import get_task

    rng = np.random.default_rng(seed)
    corpus = get_task("sentiment").tokenizer_corpus(rng, n=4000)
    tokenizer = train_tokenizer(corpus, kind="bpe", vocab_size=vocab_size)
    prompts, text = [], " ".join(corpus)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for start in range(0, len(ids) - prompt_tokens, prompt_tokens):
        prompt = tokenizer.decode(ids[start: start + prompt_tokens]).strip()
        if len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) == prompt_tokens and prompt not in prompts:
            prompts.append(prompt)
        if len(prompts) == n_prompts:
            break
    policy = build_policy(tokenizer, "tiny", n_positions=n_positions, seed=seed)
    if shape is not None:
        torch.manual_seed(seed)
        policy = GPT2LMHeadModel(GPT2Config(**{**policy.config.to_dict(), **shape}))
    torch.manual_seed(seed + 1)
    reward_model = RewardModel(GPT2Model(policy.config))
    paths = {"tokenizer": directory / "tokenizer", "policy": directory / "policy", "reward_model": directory / "rm",
             "prompts": directory / "prompts.txt"}
    tokenizer.save_pretrained(paths["tokenizer"])
    policy.save_pretrained(paths["policy"])
    reward_model.save_pretrained(paths["reward_model"])
    paths["prompts"].write_text("\n".join(prompts) + "\n")
    paths["parameters"] = sum(p.numel() for p in policy.parameters())
    return paths


def _task(world: dict):
    from rlhf_env.tasks.custom import FileTask

    return FileTask(world["prompts"], gold=lambda prompt, response: 0.0, eval_fraction=0.1)


def ours_rloo(world: dict, prompts: int, k: int, length: int, updates: int, warmup: int) -> dict:
    from agents.reinforce import Reinforce, ReinforceConfig

    def make(envs):
        return Reinforce(envs, ReinforceConfig(episodes_per_update=prompts * k, samples_per_prompt=k,
                                               learning_rate=1e-6), progress=False)

    return _time_our_agent(world, make, prompts * k, length, updates, warmup)


def ours_grpo(world: dict, prompts: int, k: int, length: int, updates: int, warmup: int) -> dict:
    """Our group-normalised REINFORCE (leave-one-out baseline, advantages divided by the group's std): GRPO's
    advantage, with the env's per-token KL in the return instead of GRPO's KL term in the loss."""
    from agents.reinforce import Reinforce, ReinforceConfig

    def make(envs):
        return Reinforce(envs, ReinforceConfig(episodes_per_update=prompts * k, samples_per_prompt=k,
                                               advantage_norm="group_std", learning_rate=1e-6), progress=False)

    return _time_our_agent(world, make, prompts * k, length, updates, warmup)


def ours_ppo(world: dict, prompts: int, k: int, length: int, updates: int, warmup: int, epochs: int = 4,
             minibatch: int = 16) -> dict:
    """Our PPO on the same work: its rollout is the same env pass, then `epochs` × minibatch steps with the value
    head on the shared trunk (``epochs=1, minibatch=prompts*k`` is the same optimizer work as one RLOO step)."""
    from agents.ppo import PPO, PPOConfig

    def make(envs):
        return PPO(envs, PPOConfig(episodes_per_update=prompts * k, minibatch_size=minibatch, update_epochs=epochs,
                                   learning_rate=1e-6), progress=False)

    return _time_our_agent(world, make, prompts * k, length, updates, warmup)


class Phases:
    """Where an update's time goes: seconds spent inside wrapped calls, by phase, per update.

    `wrap` replaces ``owner.name`` with a timed version (an attribute of that object or module only); `end_update`
    closes an update, and `summary` gives each phase's median seconds per update over the timed ones, with
    "rest" = the update's time minus the phases (for ours: the training forward, backward and step). A phase that
    runs inside another (the reward model inside our rollout) is subtracted from it by `nested`."""

    def __init__(self):
        self.current: dict[str, float] = {}
        self.updates: list[dict[str, float]] = []

    def wrap(self, owner, name: str, phase: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.current[phase] = self.current.get(phase, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)

    def end_update(self, seconds: float, nested: dict[str, str] | None = None) -> None:
        phases = dict(self.current)
        for inner, outer in (nested or {}).items():  # an inner phase's time is not its outer phase's too
            if inner in phases and outer in phases:
                phases[outer] -= phases[inner]
        phases["rest"] = seconds - sum(phases.values())
        self.updates.append(phases)
        self.current = {}

    def summary(self, skip: int) -> dict[str, float]:
        timed = self.updates[skip:]
        names = sorted({name for update in timed for name in update})
        return {name: round(float(np.median([update.get(name, 0.0) for update in timed])), 4) for name in names}


def _time_our_agent(world: dict, make_agent, episodes: int, length: int, updates: int, warmup: int) -> dict:
    """Seconds per ``agent.update()`` on the world's models, `episodes` rows of ≤ `length` new tokens, and where
    they go (``phases``: the rollout's decoding of π and π_ref with the per-token KL, the reward model, and the rest:
    advantages, the training forward, backward and optimizer step)."""
    import gymnasium as gym

    import agents.ppo
    import agents.reinforce
    import rlhf_env  # noqa: F401  (registers the env ids)

    envs = gym.make_vec("RLHF-v0", num_envs=episodes, task=_task(world), policy=world["policy"],
                        reference=world["policy"], reward_model=world["reward_model"], tokenizer=world["tokenizer"],
                        max_new_tokens=length, beta=0.05)
    agent = make_agent(envs)
    phases = Phases()
    for module in (agents.reinforce, agents.ppo):
        phases.wrap(module, "rollout", "rollout: decoding π and π_ref, KL, env")
    phases.wrap(envs.unwrapped.world, "score_components", "reward model")
    seconds, lengths = [], []
    for i in range(warmup + updates):
        start = time.perf_counter()
        metrics = agent.update()
        phases.end_update(time.perf_counter() - start, {"reward model": "rollout: decoding π and π_ref, KL, env"})
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
            lengths.append(metrics["episode/length"])
    return _summary(seconds, lengths, episodes) | {"phases": phases.summary(warmup)}


def trl_rloo(world: dict, prompts: int, k: int, length: int, updates: int, warmup: int) -> dict:
    from trl import RLOOConfig, RLOOTrainer

    return _trl_online(RLOOTrainer, RLOOConfig, world, prompts, k, length, updates, warmup)


def trl_grpo(world: dict, prompts: int, k: int, length: int, updates: int, warmup: int) -> dict:
    """TRL's `GRPOTrainer` on the RLOO row's work; β = 0.05 > 0 so that it loads and runs the reference model (its
    default β = 0 skips it), the one step per batch of `num_iterations=1`."""
    from trl import GRPOConfig, GRPOTrainer

    return _trl_online(GRPOTrainer, GRPOConfig, world, prompts, k, length, updates, warmup)


def _trl_online(trainer_cls, config_cls, world: dict, prompts: int, k: int, length: int, updates: int,
                warmup: int) -> dict:
    """Seconds per optimizer step of TRL's `trainer_cls` (RLOO or GRPO): `prompts` × `k` samples of ≤ `length`
    tokens, the same reward model as a reward function, a reference model (β = 0.05), one step per batch."""
    from datasets import Dataset

    from rlhf_env.reward_model import RewardModel

    tokenizer = load_tokenizer(world["tokenizer"])
    reward_model = RewardModel.from_pretrained(world["reward_model"])

    phases = Phases()

    @torch.no_grad()
    def reward(prompts, completions, **kwargs):  # the same reward model, on the texts TRL hands over
        # Decoded random bytes can re-tokenize longer than they were sampled: cut at the model's context.
        encoded = tokenizer([p + c for p, c in zip(prompts, completions)], return_tensors="pt", padding=True,
                            truncation=True, max_length=reward_model.config.n_positions)
        return _reward_model_call(reward_model, encoded).tolist()

    pool = _task(world).train_prompts()
    dataset = Dataset.from_dict({"prompt": pool[: prompts * (warmup + updates + 2)]})
    with tempfile.TemporaryDirectory() as out:
        config = config_cls(output_dir=out, per_device_train_batch_size=prompts * k, num_generations=k,
                            max_completion_length=length, beta=0.05, learning_rate=1e-6, num_iterations=1,
                            max_steps=warmup + updates, logging_steps=1, save_strategy="no", report_to="none",
                            use_cpu=True, bf16=False, activation_checkpointing=False, disable_dropout=True,
                            dataloader_num_workers=0, seed=0)
        timer = _timer(phases)
        phases.wrap(sys.modules[__name__], "_reward_model_call", "reward model")
        trainer = trainer_cls(model=str(world["policy"]), reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer])
        phases.wrap(trainer.model, "generate", "generate")  # the unwrapped policy TRL samples with
        trainer.train()
    lengths = [log["completions/mean_length"] for log in trainer.state.log_history
               if "completions/mean_length" in log]
    return _summary(timer.seconds[warmup:], lengths[warmup:], prompts * k) | {"phases": phases.summary(warmup)}


def trl_ppo(world: dict, prompts: int, k: int, length: int, updates: int, warmup: int, epochs: int = 4,
            minibatch: int = 16) -> dict:
    """TRL's last PPO (``trl.experimental.ppo``, shipped up to TRL 1.12 and deleted in 1.13) on the PPO row's work:
    `prompts` × `k` episodes of ≤ `length` tokens, a reference model, `epochs` × minibatches of `minibatch`. TRL's
    PPO takes its reward and value models as sequence classifiers and keeps the critic as a separate model: both are
    GPT-2s of the policy's size with a scalar head (random, like everything here). ``{"skipped": why}`` when the
    installed TRL has no PPO (``pip install "trl==1.12.0"`` in a separate environment)."""
    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError:
        return {"skipped": "this TRL has no trl.experimental.ppo (TRL <= 1.12 has)"}
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2ForSequenceClassification

    tokenizer = load_tokenizer(world["tokenizer"])

    def scalar_model(seed: int):
        torch.manual_seed(seed)
        config = GPT2Config.from_pretrained(world["policy"], num_labels=1, pad_token_id=tokenizer.pad_token_id)
        return GPT2ForSequenceClassification(config)

    episodes = prompts * k
    pool = _task(world).train_prompts()[: episodes * (warmup + updates + 1)]
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p, add_special_tokens=False)["input_ids"] for p in pool]})
    with tempfile.TemporaryDirectory() as out:
        # TRL's PPO: episodes per update = per_device_train_batch_size × gradient_accumulation_steps, split into
        # num_mini_batches minibatches.
        config = PPOConfig(output_dir=out, per_device_train_batch_size=episodes, gradient_accumulation_steps=1,
                           num_mini_batches=episodes // minibatch, num_ppo_epochs=epochs,
                           total_episodes=episodes * (warmup + updates), response_length=length,
                           local_rollout_forward_batch_size=episodes, kl_coef=0.05, learning_rate=1e-6,
                           num_sample_generations=0, logging_steps=1, save_strategy="no", report_to="none",
                           use_cpu=True, bf16=False, dataloader_num_workers=0, seed=0)
        timer = _timer()
        trainer = PPOTrainer(args=config, processing_class=tokenizer,
                             model=AutoModelForCausalLM.from_pretrained(world["policy"]),
                             ref_model=AutoModelForCausalLM.from_pretrained(world["policy"]),
                             reward_model=scalar_model(1), value_model=scalar_model(2), train_dataset=dataset,
                             callbacks=[timer])
        trainer.train()
    # TRL's PPO loop calls only on_step_end per update: time between consecutive ends (the first from train begin).
    ends = np.array(timer.ends)
    seconds = np.diff(np.concatenate([[timer.begin], ends])).tolist()
    return _summary(seconds[warmup:], [float(length)], episodes)


def _reward_model_call(reward_model, encoded) -> torch.Tensor:
    """TRL's side scores with the reward model here (a module-level function, so `Phases` can time it)."""
    return reward_model(encoded["input_ids"], encoded["attention_mask"])


def _timer(phases: Phases | None = None):
    """A TRL callback that times each optimizer step (what a Trainer counts as a step), closing an update of
    `phases` at each step's end."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.seconds, self.ends = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            if hasattr(self, "start"):
                self.seconds.append(self.ends[-1] - self.start)
                if phases is not None:
                    phases.end_update(self.seconds[-1])

    return Timer()


def _dpo_pairs(world: dict, n: int) -> list[dict]:
    """`n` pairs on the tiny world's 16-token prompts, chosen and rejected each two further prompts (~32 tokens)."""
    prompts = Path(world["prompts"]).read_text().splitlines()
    return [{"prompt": prompts[5 * i], "chosen": prompts[5 * i + 1] + " " + prompts[5 * i + 2],
             "rejected": prompts[5 * i + 3] + " " + prompts[5 * i + 4]} for i in range(n)]


def ours_dpo(world: dict, pairs: int, updates: int, warmup: int) -> dict:
    import gymnasium as gym

    import rlhf_env  # noqa: F401  (registers the env ids)
    from agents.dpo import DPO, DPOConfig
    from rlhf_env.jsonl import write_jsonl

    path = Path(world["prompts"]).with_name("pairs.jsonl")
    write_jsonl(path, _dpo_pairs(world, pairs * (warmup + updates)))
    envs = gym.make_vec("RLHF-v0", num_envs=1, task=_task(world), policy=world["policy"],
                        reference=world["policy"], reward_fn=lambda prompts, responses: [0.0] * len(prompts),
                        tokenizer=world["tokenizer"], beta=0.1)
    agent = DPO(envs, DPOConfig(batch_size=pairs, learning_rate=1e-6, pairs=str(path), eval_pairs=str(path)),
                progress=False)  # reference log-probs are computed here, before the timed steps
    seconds = []
    for i in range(warmup + updates):
        start = time.perf_counter()
        agent.update()
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return _pairs_summary(seconds, pairs)


def trl_dpo(world: dict, pairs: int, updates: int, warmup: int) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer = load_tokenizer(world["tokenizer"])
    records = _dpo_pairs(world, pairs * (warmup + updates))
    dataset = Dataset.from_dict({key: [r[key] for r in records] for key in ("prompt", "chosen", "rejected")})
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, per_device_train_batch_size=pairs, precompute_ref_log_probs=True,
                           precompute_ref_batch_size=64, beta=0.1, learning_rate=1e-6, max_length=64,
                           max_steps=warmup + updates, logging_steps=1, save_strategy="no", report_to="none",
                           use_cpu=True, bf16=False, disable_dropout=True, dataloader_num_workers=0, seed=0)
        timer = _timer()
        trainer = DPOTrainer(model=str(world["policy"]), args=config, train_dataset=dataset,
                             processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    return _pairs_summary(timer.seconds[warmup:], pairs)


def _pairs_summary(seconds: list[float], pairs: int) -> dict:
    median = float(np.median(seconds))
    return {"seconds_per_step": round(median, 4), "seconds_min": round(float(np.min(seconds)), 4),
            "pairs_per_s": round(pairs / median, 1), "steps_timed": len(seconds), "pairs": pairs,
            "seconds": [round(s, 5) for s in seconds]}


def _summary(seconds: list[float], lengths: list[float], episodes: int) -> dict:
    median = float(np.median(seconds))
    mean_length = float(np.mean(lengths)) if lengths else float("nan")
    return {"seconds_per_update": round(median, 4), "seconds_min": round(float(np.min(seconds)), 4),
            "mean_response_tokens": round(mean_length, 2),
            "tokens_per_s": round(episodes * mean_length / median, 1), "updates_timed": len(seconds),
            "episodes": episodes, "seconds": [round(s, 5) for s in seconds], "lengths": lengths}


def pooled(runs: list[dict]) -> dict:
    """One side's runs (fresh processes of `side`) as one summary: every timed update pooled, the median of each
    run in ``run_medians``, the largest peak memory."""
    if len(runs) == 1 or "seconds" not in runs[0]:
        return runs[0]
    seconds = [s for run in runs for s in run["seconds"]]
    if "pairs" in runs[0]:
        summary = _pairs_summary(seconds, runs[0]["pairs"])
        summary["run_medians"] = [run["seconds_per_step"] for run in runs]
    else:
        summary = _summary(seconds, [x for run in runs for x in run["lengths"]], runs[0]["episodes"])
        summary["run_medians"] = [run["seconds_per_update"] for run in runs]
    summary["peak_rss_mib"] = max(run["peak_rss_mib"] for run in runs)
    if all("phases" in run for run in runs):  # each phase's median over the runs
        names = sorted({name for run in runs for name in run["phases"]})
        summary["phases"] = {name: round(float(np.median([run["phases"].get(name, 0.0) for run in runs])), 4)
                             for name in names}
    return summary


# Model sizes of the scaling rows (GPT-2 shapes; parameters with the 512-token vocabulary are printed by the run).
MODEL_SIZES = {"0.5M": dict(n_embd=128, n_layer=2, n_head=4), "4M": dict(n_embd=256, n_layer=5, n_head=4),
               "30M": dict(n_embd=512, n_layer=9, n_head=8)}
SCALING_LENGTHS = (16, 64, 256)
ROWS = ("rloo", "grpo", "ppo", "dpo", "scaling")


SIDES = ("ours_rloo", "trl_rloo", "ours_grpo", "trl_grpo", "ours_ppo", "trl_ppo", "ours_dpo", "trl_dpo")


def side(name: str, world: dict, **work) -> dict:
    """Time one side of a row (`name` is one of `SIDES`) in a fresh process, alone: its result plus that process's
    peak resident memory (``peak_rss_mib``: imports, models, optimizer and activations — comparable between the two
    sides of a row because each starts from nothing)."""
    with tempfile.TemporaryDirectory() as directory:
        request, result = Path(directory) / "request.json", Path(directory) / "result.json"
        request.write_text(json.dumps({"name": name, "world": {k: str(v) for k, v in world.items()}, "work": work,
                                       "threads": torch.get_num_threads()}))
        subprocess.run([sys.executable, "-m", "benchmarks.speed", "--side", str(request), str(result)], check=True)
        return json.loads(result.read_text())


def _run_side(request_path: str, result_path: str) -> None:
    """The child of `side`: run the requested side and write its result with the process's peak memory."""
    from benchmarks.cell import peak_memory_mib

    request = json.loads(Path(request_path).read_text())
    if request["name"] not in SIDES:
        raise ValueError(f"unknown side {request['name']!r}; expected one of {SIDES}")
    torch.set_num_threads(request["threads"])
    result = globals()[request["name"]](request["world"], **request["work"])
    result["peak_rss_mib"] = round(peak_memory_mib(), 1)
    atomic_write(result_path, json.dumps(result))  # a killed side leaves no half result


def alternate(names: list[str], world: dict, rounds: int, **work) -> list[dict]:
    """Each side of `names` run `rounds` times in turn (A, B, A, B, …), each run a fresh process, pooled per side:
    this machine's speed drifts by ±15% over minutes, and alternating spreads the drift over both sides alike."""
    runs = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            runs[name].append(side(name, world, **work))
    return [pooled(runs[name]) for name in names]


def _versus(ours: dict, theirs: dict | None, work: str) -> dict:
    row = {"work": work, "ours": ours, "trl": theirs}
    if theirs is not None:
        key = "seconds_per_update" if "seconds_per_update" in ours else "seconds_per_step"
        row["speedup"] = round(theirs[key] / ours[key], 2)
        if "run_medians" in ours:  # the ratio within each round, next to the pooled one
            row["speedup_per_round"] = [round(t / o, 2) for o, t in zip(ours["run_medians"], theirs["run_medians"])]
    return row


def scaling(directory: Path, updates: int, warmup: int, with_trl: bool = True, rounds: int = 1) -> dict:
    """Our RLOO update (and TRL's, `with_trl`) on the RLOO row's 8 × 4 samples as the response length grows
    (`SCALING_LENGTHS`, the 0.48M model) and as the model grows (`MODEL_SIZES`, 32 new tokens); each point's two
    sides run `rounds` times in turn (`alternate`), with where each side's time goes (``phases``)."""
    def point(world: dict, work: dict, described: str) -> dict:
        if not with_trl:
            return _versus(pooled([side("ours_rloo", world, **work) for _ in range(rounds)]), None, described)
        return _versus(*alternate(["ours_rloo", "trl_rloo"], world, rounds, **work), described)

    out = {"response_length": [], "model_size": []}
    world = build_tiny_world(directory / "lengths", n_positions=16 + max(SCALING_LENGTHS) + 16)
    world.pop("parameters")
    for length in SCALING_LENGTHS:
        work = dict(prompts=8, k=4, length=length, updates=updates, warmup=warmup)
        out["response_length"].append({"max_new_tokens": length, **point(world, work, f"{length} tokens")})
    for name, shape in MODEL_SIZES.items():
        world = build_tiny_world(directory / name, shape=shape)
        parameters = world.pop("parameters")
        work = dict(prompts=8, k=4, length=32, updates=updates, warmup=warmup)
        out["model_size"].append({"model": name, "parameters": parameters, **point(world, work, f"{name} model")})
    return out


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--side"]:  # a child started by `side`
        return _run_side(*argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="what to time (default: all)")
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--scaling-updates", type=int, default=3, help="timed updates per scaling point")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of each side of the rloo, grpo, dpo and scaling rows, alternating (pooled per side)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import trl
    except ImportError as error:
        raise SystemExit(TRL_HINT) from error
    results = {"commit": git_commit(), "threads": args.threads, "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, "trl": trl.__version__}
    rows = set(args.rows)
    with tempfile.TemporaryDirectory() as directory:
        world = build_tiny_world(Path(directory))
        results["policy_parameters"] = world.pop("parameters")
        work = dict(prompts=8, k=4, length=32, updates=args.updates, warmup=args.warmup)
        described = "8 prompts x 4 samples, <= 32 new tokens, reference + reward model, one optimizer step"
        ours = None
        if "rloo" in rows:
            ours, theirs = alternate(["ours_rloo", "trl_rloo"], world, args.rounds, **work)
            results["rloo"] = _versus(ours, theirs, described)
        if "grpo" in rows:
            results["grpo"] = _versus(*alternate(["ours_grpo", "trl_grpo"], world, args.rounds, **work),
                                      described + "; advantages divided by the group's std")
        if "ppo" in rows:
            ours = ours or side("ours_rloo", world, **work)
            ppo = side("ours_ppo", world, **work)
            ppo_one_epoch = side("ours_ppo", world, **work, epochs=1, minibatch=32)
            theirs = side("trl_ppo", world, **work)
            results["ppo"] = {"work": "the RLOO row's rollout; PPO: 4 epochs x 2 minibatches of 16 (8 optimizer "
                                      "steps) or 1 epoch x 1 minibatch of 32 (RLOO's one step), value head on the "
                                      "shared trunk", "ours_rloo": ours, "ours_ppo": ppo,
                              "ours_ppo_1_epoch": ppo_one_epoch,
                              "ppo_over_rloo": round(ppo["seconds_per_update"] / ours["seconds_per_update"], 2),
                              "ppo_1_epoch_over_rloo": round(ppo_one_epoch["seconds_per_update"]
                                                             / ours["seconds_per_update"], 2),
                              "trl_ppo": theirs, "trl_ppo_over_ours": round(theirs["seconds_per_update"]
                                                                            / ppo["seconds_per_update"], 2)
                              if "seconds_per_update" in theirs else None}
        if "dpo" in rows:
            work = dict(pairs=16, updates=args.updates, warmup=args.warmup)
            results["dpo"] = _versus(*alternate(["ours_dpo", "trl_dpo"], world, args.rounds, **work),
                                     "16 pairs, 16-token prompts, ~32-token responses, reference log-probs "
                                     "precomputed")
        if "scaling" in rows:
            results["scaling"] = scaling(Path(directory), args.scaling_updates, 1, rounds=args.rounds)
    return report(results, args.out)


if __name__ == "__main__":
    main()
