"""An iterated reward model: during RL, fresh preference labels on the current policy's samples keep the reward
model in step with the policy it scores.

A reward model trained once, on π_SFT's samples, is asked to score the samples of a policy that drifts away from
them; the further it drifts, the more the policy finds what the reward model gets wrong (over-optimisation: the
proxy rises while the gold falls; Gao et al. 2022). Iterating the reward model is the defence of InstructGPT's
and Llama 2's pipelines (Ouyang et al. 2022; Touvron et al. 2023, §3.2.2, "iterative reward modeling"): every
`IteratedRMConfig.every` updates,

1. sample ``prompts_per_round`` training prompts and ``k`` responses to each from the current policy (π_θ, at the
   env's temperature),
2. label them with the chosen labeler (default: the task's simulated annotators, the same that labelled the
   original pairs; any `rlhf_env.pipeline.labelers.Labeler`, e.g. an LM judge or a rule judge, labels every pair
   of each group through `label_groups_by`; or a function ``labeler(groups, seed) -> pairs``),
3. continue training the current reward model on every new pair so far plus ``replay`` original pairs drawn
   afresh each round (so it does not forget what it knew of π_SFT's samples), with a fresh AdamW schedule of
   ``steps`` steps, uniform over those pairs; then put it back on the original reward model's scale: on
   ``center_groups`` of the original π_SFT sample groups its scores are given the original model's standard
   deviation (the head's weight rescaled) and mean 0 (the offset recomputed). Bradley–Terry training leaves the
   scale free and continued training grows it (margins widen), which at a fixed β would weaken the KL penalty
   round after round: measured without this, the reward model's score on the policy's samples rose from 2.1 to
   4.6 and the KL doubled,
4. put it into the env (`rlhf_env.world.RLHFWorld.set_reward_model`), so the next rollout is scored by it.

Use it as the agent's ``learn`` callback: ``agent.learn(steps, callback=IteratedRewardModel(envs))``. It logs one
line per round (`history`): the round, the labels spent so far, how well the reward model in force ranked the new
pairs *before* retraining (and the new one after), against the labels and against gold when the task has one (the
drift it corrects), and the round's wall time (sampling, labelling, training: part of the training cost).

Resume: `save` writes the reward model in force, the new pairs and the random state; `IteratedRewardModel.load`
puts them back (and the reward model into the env) before the agent is loaded, so the agent's checkpoint, which
records the env's reward model, matches, and the resumed run is the uninterrupted one.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from agents.common import at_least_one, check_field, positive
from rlhf_env.files import atomic_directory, refuse_foreign, verify_manifest, write_manifest
from rlhf_env.jsonl import dumps_jsonl
from rlhf_env.pipeline.labelers import Labeler, label_groups_by
from rlhf_env.pipeline.preferences import PreferenceConfig, label_groups, load_groups, load_pairs, sample_groups
from rlhf_env.pipeline.reward_training import (
    RewardConfig,
    normalize_reward_model,
    pairwise_accuracy,
    score_texts,
    train_reward_model,
)
from rlhf_env.vector_env import RLHFVectorEnv

LabelFunction = Callable[[list[dict], int], list[dict]]
"""``labeler(groups, seed) -> pairs``: preference pairs ``{"prompt", "chosen", "rejected", ...}`` for sampled
groups ``{"prompt", "responses", "gold"}`` (`rlhf_env.pipeline.preferences`), labelled reproducibly from `seed`."""

FILES = {"reward_model.safetensors", "pairs.jsonl", "state.json"}


@dataclass(frozen=True)
class IteratedRMConfig:
    every: int = 100
    """Updates between two rounds of fresh labels (the first round after `every` updates)."""
    prompts_per_round: int = 256
    """Training prompts sampled per round."""
    k: int = 4
    """Responses per prompt; a labeler judges each of their C(k, 2) pairs (pairs of equal responses, and for the
    simulated annotators at temperature 0 pairs of equal gold, carry no preference and are dropped)."""
    steps: int = 100
    """Reward-model optimizer steps per round, on all new pairs plus `replay` original ones."""
    replay: int = 1024
    """Original pairs drawn (without replacement) into each round's training data."""
    center_groups: int = 256
    """Original π_SFT sample groups (the first ones) the reward model is re-centred on after each round."""
    learning_rate: float = 2e-4
    """Peak AdamW learning rate of each round's schedule (warm-up, cosine decay); below the 5e-4 of the first
    training, since each round continues from the reward model in force."""
    batch_size: int = 32
    """Pairs per reward-model step (a step at 32 pairs takes ~0.16 s on one CPU thread for the built-in RM)."""
    warmup_steps: int = 20
    """Linear warm-up steps of each round."""
    max_rounds: int | None = None
    """Stop labelling after this many rounds (None: every `every` updates until training ends)."""
    seed: int = 0
    """Seeds the prompts, samples, labels and reward-model batches of every round."""

    def __post_init__(self):
        for name in ("every", "prompts_per_round", "steps", "batch_size", "center_groups"):
            check_field(self, name, at_least_one, "an integer ≥ 1")
        for name in ("warmup_steps", "replay"):
            check_field(self, name, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                        "an integer ≥ 0")
        check_field(self, "k", lambda v: isinstance(v, int) and v >= 2, "an integer ≥ 2 (a pair needs two)")
        check_field(self, "learning_rate", positive, "a finite number > 0")
        check_field(self, "max_rounds", lambda v: v is None or (isinstance(v, int) and v >= 0),
                    "None or an integer ≥ 0")
        check_field(self, "seed", lambda v: isinstance(v, int) and v >= 0, "an integer ≥ 0")


class IteratedRewardModel:
    """A ``learn`` callback that retrains the env's reward model on fresh labels of the current policy's samples
    every ``config.every`` updates and swaps it into the env (module docstring).

    `envs`: the agent's vector env, built with a single reward model (``reward_model=``, the default). `pairs`: the
    preference pairs the reward model was trained on, kept in every round's training data, and `groups`: the π_SFT
    samples its offset was centred on (default: the built-in task's, from its assets). `labeler`: how new samples
    are labelled (default: the task's simulated annotators, pairwise). `ValueError` for an env without a reward
    model, or no pairs."""

    def __init__(self, envs, config: IteratedRMConfig = IteratedRMConfig(),
                 labeler: Labeler | LabelFunction | None = None, pairs: list[dict] | None = None,
                 groups: list[dict] | None = None):
        world = envs.unwrapped.world if not isinstance(envs, RLHFVectorEnv) else envs.world
        if world.named_rewards or world.reward_model is None:
            raise ValueError("IteratedRewardModel retrains the env's reward model: build the env with a single "
                             "reward_model= (not reward_fn= or rewards=)")
        if pairs is None or groups is None:
            from rlhf_env.assets import asset_dir, load_preference_pairs

            assets = asset_dir(world.task)
            pairs = load_preference_pairs(assets) if pairs is None else pairs
            groups = load_groups(assets / "preferences" / "groups_train.jsonl") if groups is None else groups
        if not pairs:
            raise ValueError("IteratedRewardModel needs the reward model's original preference pairs (pairs=)")
        if not groups:
            raise ValueError("IteratedRewardModel needs π_SFT sample groups to re-centre the reward model on "
                             "(groups=)")
        self.world, self.config = world, config
        if labeler is None:  # the task's simulated annotators, pairwise, as they labelled the original pairs
            labeler = functools.partial(_label_simulated, world.task.annotator)
        elif hasattr(labeler, "prefer"):  # a Labeler (rlhf_env.pipeline.labelers): every pair of each group
            labeler = functools.partial(_label_with, labeler)
        self.labeler: LabelFunction = labeler
        self.base_pairs, self.groups = list(pairs), list(groups)[:config.center_groups]
        self.scale = self._score_std(world.reward_model)  # the original reward model's scale on π_SFT samples
        self.new_pairs: list[dict] = []
        self.rng = np.random.default_rng(config.seed)
        self.rounds = 0
        self.history: list[dict] = []

    @property
    def labels(self) -> int:
        """New labels spent so far (pairs judged in all rounds)."""
        return len(self.new_pairs)

    def __call__(self, agent, metrics: dict) -> None:
        cfg = self.config
        if agent.num_updates % cfg.every or (cfg.max_rounds is not None and self.rounds >= cfg.max_rounds):
            return
        self.round(agent.num_updates)

    def round(self, updates: int = 0) -> dict:
        """One round: sample, label, retrain, swap (module docstring). Returns its log line. A round that raises
        (a labeler's error, say) changes nothing: the env keeps its reward model and the random state is put back,
        so a retry is the round that would have run."""
        rng_state = self.rng.bit_generator.state
        try:
            return self._round(updates)
        except BaseException:
            self.rng.bit_generator.state = rng_state
            raise

    def _round(self, updates: int) -> dict:
        cfg, world, start = self.config, self.world, time.perf_counter()
        seed = int(self.rng.integers(2**31 - 1))
        was_training = world.policy.training
        world.policy.eval()
        try:
            groups = sample_groups(world.policy, world.tokenizer, world.task,
                                   PreferenceConfig(n_prompts=cfg.prompts_per_round, k=cfg.k, seed=seed,
                                                    temperature=world.temperature, sampling_backend="auto"),
                                   progress=False)
        finally:
            world.policy.train(was_training)
        new = self.labeler(groups, seed)
        line = {"round": self.rounds + 1, "updates": updates, "new_pairs": len(new),
                "labels": self.labels + len(new), **self._accuracy(world.reward_model, new)}
        data_size = min(cfg.replay, len(self.base_pairs)) + len(self.new_pairs) + len(new)
        if data_size == 0:  # every sample tied: nothing to learn this round, the reward model stays
            self.rounds += 1
            self.history.append(line | {"seconds": round(time.perf_counter() - start, 2)})
            return self.history[-1]
        replayed = self.rng.choice(len(self.base_pairs), size=min(cfg.replay, len(self.base_pairs)), replace=False)
        model = copy.deepcopy(world.reward_model)
        train_reward_model(model, world.tokenizer, [self.base_pairs[i] for i in replayed] + self.new_pairs + new, None,
                           RewardConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.learning_rate,
                                        warmup_steps=cfg.warmup_steps, seed=seed), progress=False)
        with torch.no_grad():
            model.head.weight.mul_(self.scale / self._score_std(model))
        normalize_reward_model(model, world.tokenizer, self.groups)
        world.set_reward_model(model)
        self.new_pairs += new
        self.rounds += 1
        line.update({f"after/{k}": v for k, v in self._accuracy(model, new).items()})
        self.history.append(line | {"seconds": round(time.perf_counter() - start, 2)})
        return self.history[-1]

    def _score_std(self, model) -> float:
        """The standard deviation of `model`'s scores of the centring groups' responses (π_SFT samples)."""
        prompts = [g["prompt"] for g in self.groups for _ in g["responses"]]
        responses = [r for g in self.groups for r in g["responses"]]
        return float(score_texts(model, self.world.tokenizer, prompts, responses).std())

    def _accuracy(self, model, pairs: list[dict]) -> dict:
        """How `model` ranks `pairs`: agreement with the labels, and with gold where the pairs carry it."""
        if not pairs:
            return {}
        prompts = [p["prompt"] for p in pairs]
        chosen = score_texts(model, self.world.tokenizer, prompts, [p["chosen"] for p in pairs])
        rejected = score_texts(model, self.world.tokenizer, prompts, [p["rejected"] for p in pairs])
        out = {"rm_accuracy_labels": pairwise_accuracy(chosen, rejected)}
        if all("chosen_gold" in p for p in pairs):
            gold = torch.tensor([p["chosen_gold"] - p["rejected_gold"] for p in pairs])
            differ = gold != 0
            if differ.any():
                sign = torch.sign(gold[differ])
                out["rm_accuracy_gold"] = pairwise_accuracy(sign * chosen[differ], sign * rejected[differ])
        return out

    # ---------------------------------------------------------------- checkpoints
    def _base_digest(self) -> str:
        return hashlib.sha256(dumps_jsonl(self.base_pairs).encode("utf-8")).hexdigest()

    def save(self, directory: str | Path) -> None:
        """The reward model in force (its exact tensors), the new pairs, the round counter, the history and the
        random state, written in one step; `ValueError` for a folder that holds anything else."""
        directory = Path(directory)
        refuse_foreign(directory, FILES | {"manifest.json"} if directory.is_dir() else None,
                       "an iterated reward model")
        state = {"config": asdict(self.config), "rounds": self.rounds, "history": self.history, "scale": self.scale,
                 "rng": self.rng.bit_generator.state, "base_pairs_sha256": self._base_digest()}
        text = json.dumps(state, indent=1)
        with atomic_directory(directory) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.world.reward_model.state_dict().items()},
                      tmp / "reward_model.safetensors")
            (tmp / "pairs.jsonl").write_text(dumps_jsonl(self.new_pairs), encoding="utf-8")
            (tmp / "state.json").write_text(text)
            write_manifest(tmp, {"format": "rlhf-gym iterated reward model 1"})

    @classmethod
    def load(cls, directory: str | Path, envs, labeler: Labeler | LabelFunction | None = None,
             pairs: list[dict] | None = None, groups: list[dict] | None = None) -> IteratedRewardModel:
        """Resume from `save` in `envs` (built as the original run's, its reward model the original one), before the
        agent is loaded: the saved reward model goes into the env. `ValueError`, with the env unchanged, for a
        damaged folder, other original pairs, or a reward model of another shape."""
        directory = Path(directory)
        verify_manifest(directory, "iterated reward model")
        state = json.loads((directory / "state.json").read_text())
        out = cls(envs, IteratedRMConfig(**state["config"]), labeler, pairs, groups)
        if out._base_digest() != state["base_pairs_sha256"]:
            raise ValueError(f"{directory} was trained on other original pairs than the ones given (their sha256 "
                             "differs)")
        model = copy.deepcopy(out.world.reward_model)
        tensors = load_file(directory / "reward_model.safetensors")
        if set(tensors) != set(model.state_dict()) or any(
                tensors[k].shape != v.shape for k, v in model.state_dict().items()):
            raise ValueError(f"{directory}: the saved reward model does not fit the env's (other parameters or "
                             "shapes)")
        model.load_state_dict(tensors)
        saved_pairs = directory / "pairs.jsonl"
        out.new_pairs = load_pairs(saved_pairs) if saved_pairs.stat().st_size else []  # empty: no round yet
        out.rounds, out.history, out.scale = state["rounds"], state["history"], state["scale"]
        out.rng.bit_generator.state = state["rng"]
        out.world.set_reward_model(model)
        return out


def _label_with(labeler, groups: list[dict], seed: int) -> list[dict]:
    """A `Labeler`'s pairs for sampled groups: every pair of each group, ties dropped (`label_groups_by`)."""
    return label_groups_by(labeler, groups, seed=seed)


def _label_simulated(annotator, groups: list[dict], seed: int) -> list[dict]:
    """The simulated annotators' pairwise labels of sampled groups (`label_groups`, as the assets were labelled)."""
    return label_groups(groups, annotator, "pairwise", seed)
