"""One cell of the benchmark grid: one algorithm on one task, with one reward, β and seed — trained, evaluated on
held-out prompts and written to one JSON record (config, commit, metrics, timing, peak memory, training curve).

`benchmarks.run` runs each cell in a fresh process (``python -m benchmarks.cell CONFIG.json OUT.json``): a cell's
peak memory is then its own, and no state (RNGs, caches, the KL controller) leaks from one cell into the next, so
a cell gives the same numbers whatever ran before it.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from agents.presets import PRESETS
from rlhf_env.files import atomic_write_json

PRESET_PREFIX = "preset_"
"""``preset_<name>`` runs `agents.reinforce.Reinforce` with the preset <name> of `agents.presets`."""

# What each algorithm name runs, and what its `budget` counts.
ALGORITHMS = {
    "sft": "π_SFT itself, untrained: the floor (budget unused)",
    "best_of_n": "best of `budget` π_SFT samples by the cell's reward, at inference time (no training)",
    "ppo": "agents.ppo.PPO, default PPOConfig (value head on the policy's trunk); budget = env steps",
    "rloo": "agents.reinforce.Reinforce, baseline 'rloo', K = 4; budget = env steps",
    "grpo": "Reinforce, baseline 'rloo', advantage_norm 'group_std' (GRPO-style advantages), K = 4; budget = env "
            "steps",
    "reinforce_ma": "Reinforce, baseline 'moving_average', K = 1; budget = env steps",
    "reinforce_value": "Reinforce, baseline 'value' (learned, per token), K = 1; budget = env steps",
    "dpo": "agents.dpo.DPO on the task's preference pairs, its β the env's β; budget = preference pairs",
    "optimum": "not an agent: the KL-regularised optimum β·log E_π_ref[exp(r/β)] of the cell's reward, estimated "
               "from `budget` π_ref samples per prompt on `eval_episodes` held-out prompts",
} | {
    f"{PRESET_PREFIX}{name}": f"Reinforce, the {name!r} preset of agents.presets, K = 4; "
    + ("its KL term in the loss at the cell's β (kl_coef = β, the env's β = 0)" if preset["kl_in_loss"] else
       "the KL in the env's reward at the cell's β, as in every cell"
       + ("" if name in ("rloo", "reinforce_pp") else " (the paper trains without a KL term)"))
    + "; budget = env steps"
    for name, preset in PRESETS.items()
}
# Training curves keep these metrics (when the algorithm logs them), averaged over windows of updates.
UNTRAINED = ("sft", "best_of_n", "optimum")  # the algorithms that train no agent
DIRECT_RLAIF_REFERENCES = 2
# Where the cell's reward comes from (reward "rm"): which labels trained its reward model, and how.
FEEDBACK = {
    "human": "the task's reward model, trained once on the simulated human annotators' labels of π_SFT samples",
    "iterated": "the same reward model, retrained during RL on fresh human labels of the current policy's samples "
                "every 100 updates (agents.iterated_rm, default IteratedRMConfig)",
    "rule_judge": "a reward model trained as the task's on the same π_SFT samples, labelled by the task's "
                  "constitution instead (rlhf_env.pipeline.feedback, RLAIF with a rule judge)",
    "lm_judge": "a reward model trained as the task's on the same π_SFT samples, labelled by the built-in LM judge "
                "(π_SFT fine-tuned on 1,000 human labels; rlhf_env.pipeline.feedback)",
    "direct_rlaif": "no reward model: the task's constitution asked online, the reward the judged win rate against "
                    f"{DIRECT_RLAIF_REFERENCES} π_SFT samples of the same prompt (rlhf_env.judge_reward.JudgeReward)",
}
CURVE_KEYS = ("objective/score", "objective/gold_score", "objective/kl", "episode/well_formed", "episode/length",
              "loss/dpo", "rewards/accuracies", "rewards/margins")
CURVE_POINTS = 100
CHECKPOINTS = 8  # held-out evaluations during training (plus the one before it), for the frontier and Gao's curves
CHECKPOINT_EPISODES = 128


@dataclass(frozen=True)
class CellConfig:
    algorithm: str
    """One of `ALGORITHMS`."""
    task: str = "sentiment"
    reward: str = "rm"
    """What the agent optimises (and best-of-n selects by): "rm", the task's learned reward model, or "gold"."""
    beta: float = 0.1
    """The env's KL coefficient (DPO's β too)."""
    seed: int = 0
    budget: int = 0
    """Env steps (RL agents), preference pairs (DPO), n (best-of-n), samples per prompt (optimum); see ALGORITHMS."""
    eval_episodes: int = 512
    """Held-out episodes for the evaluation (prompts, for the optimum)."""
    num_envs: int = 64
    device: str = "auto"
    threads: int | None = None
    """torch threads (None: torch's default, one per core)."""
    weight: float | None = None
    """The two-objective setting (the grid's ``--pareto``): the weight λ ∈ [0, 1] of the task's second gold
    objective (`rlhf_env.tasks.Task.objectives`; "brevity" on sentiment), paid with ``rewards=`` as
    (1 − λ)·r + λ·objective₂, where r is the cell's `reward` for the first objective. None: `reward` alone."""
    kl_target: float | None = None
    """Adaptive β (Ziegler et al.'s controller, starting at `beta`) toward this KL per episode, in nats; None: β
    fixed. The Pareto sweep sets it so that every weight spends the same KL budget."""
    kl_horizon: int = 10_000
    """The adaptive controller's horizon in episodes (used with `kl_target` only)."""
    feedback: str = "human"
    """Where the reward model's labels come from (`FEEDBACK`); other than "human" needs reward "rm" and an RL
    agent."""
    processes: int = 1
    """Data-parallel ranks the agent trains on (`agents.distributed`): > 1 runs the cell under ``torchrun``
    (`benchmarks.run.cell_command`), each rank with ``num_envs / processes`` env rows and its share of every
    batch; rank 0 evaluates and writes the record. The training algorithms only."""

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; expected one of {sorted(ALGORITHMS)}")
        if self.reward not in ("rm", "gold"):
            raise ValueError(f"reward must be 'rm' or 'gold', got {self.reward!r}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.budget < (0 if self.algorithm == "sft" else 1):
            raise ValueError(f"{self.algorithm} needs a budget ≥ 1, got {self.budget}")
        if self.eval_episodes < 1:
            raise ValueError(f"eval_episodes must be ≥ 1, got {self.eval_episodes}")
        if self.weight is not None and not 0 <= self.weight <= 1:
            raise ValueError(f"weight must be in [0, 1], got {self.weight}")
        if self.kl_target is not None and not self.kl_target > 0:
            raise ValueError(f"kl_target must be > 0 nats, got {self.kl_target}")
        if self.kl_horizon < 1:
            raise ValueError(f"kl_horizon must be ≥ 1 episode, got {self.kl_horizon}")
        if self.feedback not in FEEDBACK:
            raise ValueError(f"unknown feedback {self.feedback!r}; expected one of {sorted(FEEDBACK)}")
        if self.feedback != "human" and (self.reward != "rm" or self.algorithm in (*UNTRAINED, "dpo")):
            raise ValueError(f"feedback={self.feedback!r} shapes the reward model an RL agent trains on: it needs "
                             f"reward='rm' and an RL algorithm, got reward={self.reward!r}, {self.algorithm!r}")
        if self.feedback != "human" and self.weight is not None:
            raise ValueError(f"feedback={self.feedback!r} with a weight: the two-objective cells use the task's own "
                             "reward model")
        if self.feedback == "iterated" and self.processes > 1:
            raise ValueError("feedback='iterated' runs on one process (its rounds sample and retrain on rank 0)")
        if not (isinstance(self.processes, int) and self.processes >= 1):
            raise ValueError(f"processes must be an integer ≥ 1, got {self.processes!r}")
        if self.processes > 1 and self.algorithm in UNTRAINED:
            raise ValueError(f"processes={self.processes}: {self.algorithm!r} trains nothing; only the training "
                             "algorithms run on several processes")
        if self.num_envs % self.processes:
            raise ValueError(f"num_envs={self.num_envs} is not a multiple of processes={self.processes} (each rank "
                             "gets num_envs / processes env rows)")
        if self.kl_in_loss and self.kl_target is not None:
            raise ValueError(f"{self.algorithm} pays its KL in the loss at the fixed coefficient β; the env's adaptive "
                             "controller (kl_target) cannot steer it")

    @property
    def kl_in_loss(self) -> bool:
        """The cell's agent pays β·KL in its loss (a preset with kl_in_loss): the env's own β is then 0."""
        preset = PRESETS.get(self.algorithm.removeprefix(PRESET_PREFIX))
        return self.algorithm.startswith(PRESET_PREFIX) and bool(preset["kl_in_loss"])

    @property
    def name(self) -> str:
        """The cell's file name (without .json): every field that changes its numbers, except the machine's."""
        name = (f"{self.algorithm}-{self.task}-{self.reward}-b{self.beta:g}-n{self.budget}-s{self.seed}"
                f"-e{self.eval_episodes}")
        if self.weight is not None:
            name += f"-w{self.weight:g}"
        if self.kl_target is not None:
            name += f"-kt{self.kl_target:g}-h{self.kl_horizon}"
        if self.feedback != "human":
            name += f"-f{self.feedback}"
        if self.processes > 1:
            name += f"-p{self.processes}"
        return name


def direct_rlaif_reward(task, seed: int):
    """The "direct_rlaif" cells' reward: the task's constitution asked online against `DIRECT_RLAIF_REFERENCES`
    π_SFT samples per episode (`rlhf_env.judge_reward.JudgeReward`, seeded by the cell's seed)."""
    from rlhf_env.assets import asset_dir, load_assets
    from rlhf_env.judge_reward import JudgeReward
    from rlhf_env.pipeline.feedback import constitution

    tokenizer, policy, _ = load_assets(asset_dir(task))
    return JudgeReward(constitution(task), policy, tokenizer, task.max_new_tokens,
                       references=DIRECT_RLAIF_REFERENCES, seed=seed)


def env_kwargs(config: CellConfig, task) -> dict:
    """The env's keyword arguments for `config` (besides the task and the number of rows): β (0 for a cell whose
    agent pays the KL in its loss), the KL controller and
    the reward — the task's reward model (the env's default), its gold reward, or with a `weight` both of the task's
    first two gold objectives weighted (`ValueError` for a task with only one)."""
    from rlhf_env.assets import asset_dir

    kwargs = dict(beta=0.0 if config.kl_in_loss else config.beta, device=config.device)
    if config.kl_target is not None:
        kwargs.update(kl_target=config.kl_target, kl_horizon=config.kl_horizon)
    if config.weight is None:
        if config.reward == "gold":
            kwargs["reward_fn"] = task.gold_reward
        elif config.feedback in ("rule_judge", "lm_judge"):
            from rlhf_env.pipeline.feedback import feedback_reward_model

            kwargs["reward_model"] = feedback_reward_model(config.feedback, task, progress=False)
        elif config.feedback == "direct_rlaif":
            kwargs["reward_fn"] = direct_rlaif_reward(task, config.seed)
        return kwargs
    objectives = task.objectives()
    if len(objectives) < 2:
        raise ValueError(f"weight={config.weight} needs a task with two gold objectives; {task.name!r} has "
                         f"{list(objectives)} (Task.objectives)")
    (first, gold), (second, other) = list(objectives.items())[:2]
    first_source = gold if config.reward == "gold" else asset_dir(task) / "reward_model"
    kwargs.update(rewards={first: first_source, second: other},
                  reward_weights={first: 1 - config.weight, second: config.weight})
    return kwargs


def make_agent(config: CellConfig, envs, progress: bool = True):
    """The agent a cell trains (default config or a preset's, the cell's seed), or None for the algorithms that do
    not train."""
    from agents.dpo import DPO, DPOConfig
    from agents.ppo import PPO, PPOConfig
    from agents.reinforce import Reinforce, ReinforceConfig

    seed, algorithm = config.seed, config.algorithm
    if algorithm == "ppo":
        return PPO(envs, PPOConfig(seed=seed), progress=progress)
    if algorithm == "dpo":
        return DPO(envs, DPOConfig(seed=seed), progress=progress)
    reinforce = {"rloo": dict(baseline="rloo"), "grpo": dict(baseline="rloo", advantage_norm="group_std"),
                 "reinforce_ma": dict(baseline="moving_average", samples_per_prompt=1),
                 "reinforce_value": dict(baseline="value", samples_per_prompt=1)}
    if algorithm in reinforce:
        return Reinforce(envs, ReinforceConfig(seed=seed, **reinforce[algorithm]), progress=progress)
    if algorithm.startswith(PRESET_PREFIX):  # the recipe's loss; its KL coefficient (if in the loss) the cell's β
        overrides = dict(seed=seed, **({"kl_coef": config.beta} if config.kl_in_loss else {}))
        return Reinforce(envs, ReinforceConfig.preset(algorithm.removeprefix(PRESET_PREFIX), **overrides),
                         progress=progress)
    return None


def training_curve(history: list[dict], points: int = CURVE_POINTS) -> list[dict]:
    """The per-update metrics in ≤ `points` windows of consecutive updates: each window's mean of `CURVE_KEYS`, its
    last ``timesteps`` and the training wall time (seconds) at its end."""
    if not history:
        return []
    seconds = np.cumsum([h["time/update_seconds"] for h in history])
    curve = []
    for window in np.array_split(np.arange(len(history)), min(points, len(history))):
        end = int(window[-1])
        point = {"updates": end + 1, "timesteps": history[end]["time/timesteps"], "seconds": float(seconds[end])}
        for key in CURVE_KEYS:
            values = [history[i][key] for i in window if key in history[i]]
            if values:
                point[key] = float(np.mean(values))
        curve.append(point)
    return curve


class Checkpoints:
    """A `learn` callback that evaluates the policy on `episodes` held-out episodes whenever training has taken
    another 1/`count` of `budget` (and once before training): the policy's path through (KL, gold, proxy score).

    `beta`: the β of the reported objective (`agents.evaluate.evaluate`; None: the env's).
    `agents.evaluate.evaluate` uses its own seed and restores the KL controller, so these evaluations do not change
    the course of training (tests check a run with and without them ends bit-identical).
    """

    KEYS = ("objective/gold_score", "objective/score", "objective/kl", "episode/well_formed", "objective/win_rate")

    def __init__(self, envs, budget: int, seed: int, count: int = CHECKPOINTS, episodes: int = CHECKPOINT_EPISODES,
                 beta: float | None = None):
        self.envs, self.seed, self.episodes, self.beta = envs, seed, episodes, beta
        self.thresholds = [budget * (i + 1) / count for i in range(count)]
        self.seconds = 0.0  # training time so far, evaluations excluded
        self.points: list[dict] = []
        self._record(0, 0)

    def _record(self, timesteps: int, updates: int) -> None:
        from agents.evaluate import evaluate

        metrics = evaluate(self.envs, self.episodes, seed=self.seed, beta=self.beta)
        self.points.append({"timesteps": timesteps, "updates": updates, "seconds": round(self.seconds, 2),
                            **{key: metrics[key] for key in self.KEYS},
                            **{key: value for key, value in metrics.items() if key.startswith("objective/gold/")}})

    def __call__(self, agent, metrics: dict) -> None:
        self.seconds += metrics["time/update_seconds"]
        passed = [t for t in self.thresholds if agent.num_timesteps >= t]
        if passed:  # one evaluation, however many thresholds this update crossed
            self.thresholds = self.thresholds[len(passed):]
            self._record(agent.num_timesteps, agent.num_updates)


def peak_memory_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def cell_ranks(config: CellConfig):
    """This process's `agents.distributed.Ranks` and device for `config`: one process alone, or under ``torchrun``
    (`config.processes` > 1) the initialised process group. `ValueError` when the two disagree (a cell of N
    processes started without ``torchrun``, or with another ``--nproc_per_node``)."""
    from agents.distributed import init_from_environment

    ranks, device = init_from_environment(config.device)
    if ranks.world_size != config.processes:
        raise ValueError(f"cell {config.name}: processes={config.processes} but {ranks.world_size} process(es) "
                         f"run it; start it with benchmarks.run.cell_command (torchrun --nproc_per_node "
                         f"{config.processes} for more than one)")
    return ranks, device


def run_cell(config: CellConfig, progress: bool = True) -> dict | None:
    """Train and evaluate one cell; returns its record (what `main` writes as JSON). Under ``torchrun``
    (`config.processes` > 1; see `cell_ranks`) every rank trains and rank 0 alone evaluates (the policy is the same
    on every rank) and returns the record; the other ranks return None. Timing and memory are rank 0's."""
    import gymnasium as gym
    import torch

    import rlhf_env
    from agents.evaluate import best_of_n, evaluate, kl_regularised_optimum
    from benchmarks.report import git_commit
    from rlhf_env.pipeline.sft import heldout_perplexity

    ranks, device = cell_ranks(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    task = rlhf_env.tasks.get_task(config.task)
    envs = gym.make_vec(rlhf_env.env_id(config.task), num_envs=config.num_envs // config.processes,
                        **{**env_kwargs(config, task), "device": device})
    world = envs.unwrapped.world
    eval_seed = 10_000 + config.seed
    objective_beta = config.beta if config.kl_in_loss else None  # the objective's β: the env's, or the loss's
    start = time.perf_counter()
    agent, curve, checkpoints, metrics, feedback = None, [], None, {}, {}
    if config.algorithm == "optimum":
        metrics = kl_regularised_optimum(envs, None, config.beta, n_prompts=config.eval_episodes,
                                         n_samples=config.budget, seed=config.seed)
    elif config.algorithm == "best_of_n":
        metrics = best_of_n(envs, config.budget, config.eval_episodes, seed=eval_seed)
    else:
        agent = make_agent(config, envs, progress)
        if agent is not None:
            callbacks = []
            if ranks.is_main:  # the held-out evaluations during training (the other ranks wait for rank 0's)
                checkpoints = Checkpoints(envs, config.budget, seed=20_000 + config.seed, beta=objective_beta)
                callbacks.append(checkpoints)
            if config.feedback == "iterated":
                from agents.iterated_rm import IteratedRewardModel, IteratedRMConfig

                iterated = IteratedRewardModel(envs, IteratedRMConfig(seed=config.seed))
                callbacks.insert(0, iterated)  # the checkpoint after a round scores with the new reward model
            agent.learn(config.budget, callback=lambda agent, metrics: [c(agent, metrics) for c in callbacks])
            curve = training_curve(agent.logger.history)
            if config.feedback == "iterated":
                feedback = {"labels": iterated.labels, "rounds": iterated.history}
    if config.feedback in ("rule_judge", "lm_judge"):
        from rlhf_env.pipeline.feedback import feedback_report

        feedback = feedback_report(config.feedback, task)
    elif config.feedback == "direct_rlaif":
        judged = world.reward_fn
        feedback = {"judge": judged.judge.name, "references": judged.references, "calls": judged.calls,
                    "comparisons": judged.comparisons, "seconds": round(judged.seconds, 1),
                    "seconds_per_episode": judged.seconds_per_episode}
    if not ranks.is_main:
        return None
    # Training alone (the updates, checkpoint evaluations excluded); for best-of-n, its sampling and scoring.
    train_seconds = checkpoints.seconds if checkpoints else time.perf_counter() - start
    train_seconds += sum(line["seconds"] for line in feedback.get("rounds", []))  # the iterated RM's rounds
    if config.algorithm not in ("optimum", "best_of_n"):
        metrics = evaluate(envs, config.eval_episodes, seed=eval_seed, beta=objective_beta)
        if config.algorithm == "dpo":
            metrics.update(agent.evaluate_preferences())
    if config.algorithm != "optimum":  # best-of-n and sft: π_SFT's own perplexity
        metrics["perplexity"] = heldout_perplexity(world.policy, world.tokenizer, task)["perplexity"]
    wall_seconds = time.perf_counter() - start
    memory = {"peak_rss_mib": round(peak_memory_mib(), 1)}
    if world.device.type == "cuda":
        memory["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(world.device) / 2**20, 1)
    return {"name": config.name, "config": asdict(config), "commit": git_commit(), "metrics": metrics,
            "timing": {"train_seconds": round(train_seconds, 1), "wall_seconds": round(wall_seconds, 1),
                       "updates": getattr(agent, "num_updates", 0), "timesteps": getattr(agent, "num_timesteps", 0)},
            "memory": memory, "curve": curve, "checkpoints": checkpoints.points if checkpoints else [],
            "feedback": feedback,
            "machine": {"device": str(world.device), "processes": ranks.world_size,
                        "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "python": platform.python_version(), "platform": platform.platform()}}


def main(argv: list[str] | None = None) -> dict | None:
    """``python -m benchmarks.cell CONFIG.json OUT.json [--no-progress]``: run the cell CONFIG describes, write its
    record to OUT (atomically: a cell whose OUT exists is finished). A cell of N > 1 processes runs as
    ``torchrun --standalone --nproc_per_node N -m benchmarks.cell CONFIG.json OUT.json``; rank 0 writes OUT."""
    argv = sys.argv[1:] if argv is None else argv
    progress = "--no-progress" not in argv
    argv = [a for a in argv if a != "--no-progress"]
    if len(argv) != 2:
        raise SystemExit("usage: python -m benchmarks.cell CONFIG.json OUT.json [--no-progress]")
    config = CellConfig(**json.loads(Path(argv[0]).read_text()))
    if config.processes > 1:
        from agents.distributed import shut_down
        from benchmarks.processes import die_with_parent

        die_with_parent()  # a torchrun worker: dies with its launcher, which dies with the grid
        result, finished = None, False
        try:
            result = run_cell(config, progress)
            finished = True
        finally:
            shut_down(finished)
    else:
        result = run_cell(config, progress)
    if result is not None:  # rank 0
        atomic_write_json(argv[1], result)
    return result


if __name__ == "__main__":
    main()
