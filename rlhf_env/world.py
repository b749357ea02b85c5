"""The world both envs serve: task, tokenizer, acting policy π, frozen reference π_ref, reward model or function,
the KL coefficient and its controller, and the step that pays each token (`RLHFWorld.step_rows`, with the pure
arithmetic of `rlhf_env.reward`).

Legend: ``P`` query tokens (padded to the longest prompt of the task), ``T`` = max_new_tokens, ``V`` actions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.error import InvalidAction, ResetNeeded
from torch import nn
from transformers import PreTrainedModel

from rlhf_env.chat import (
    CONVERSATION,
    check_prompt,
    detect_end_of_turn,
    is_conversation,
    prompt_key,
    prompt_text,
    require_chat_template,
)
from rlhf_env.decoding.batched import BatchedDecoder
from rlhf_env.episodes import EpisodeBatch
from rlhf_env.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_estimate
from rlhf_env.lm import pad_left, pad_right
from rlhf_env.lora import AdaptersOff, check_lora_policy, is_lora_config, is_peft_model, require_peft, wrap_policy
from rlhf_env.models import check_decodable, choose_backend, load_causal_lm, load_tokenizer, resolve_device
from rlhf_env.reward import (
    NONFINITE_POLICIES,
    PER_ITEM_HINT,
    NonFiniteReward,
    call_reward_fn,
    callable_name,
    check_token_rewards,
    checked_score,
    context_names,
    fits_float32,
    real_score,
    terminal_reward,
    token_reward,
)
from rlhf_env.reward_model import RewardModel, encode_for_reward_model, same_tokenizer
from rlhf_env.tasks import DEFAULT_TASK, Task, get_task
from rlhf_env.text import encode_prompts

RESET_OPTIONS = frozenset({"prompt", "split"})
KL_MODES = ("policy", "agent", "reference")


def check_seed(seed) -> int | None:
    """A reset's `seed` as an int ≥ 0 or None: `TypeError` for anything but an int, a numpy integer or None (a bool,
    a float such as 2.5, a string), `ValueError` for a negative int."""
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int ≥ 0 or None, got {type(seed).__name__} {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be an int ≥ 0 or None, got {seed}")
    return int(seed)


def _is_real(value) -> bool:
    """A real number that is not a bool (int, float, numpy real scalars)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def checked_integer(name: str, value, minimum: int = 1) -> int:
    """`value` as an int ≥ `minimum` (numpy integers accepted), or `ValueError` naming the argument `name`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {type(value).__name__} {value!r}")
    return int(value)


@dataclass
class RewardSource:
    """One reward the world scores finished episodes with: a reward model (``model``, read through the policy's ids
    or, when ``tokenizer`` is set, its own re-encoding of the text) or a batched reward function (``fn``, called
    with the `rlhf_env.reward.REWARD_CONTEXT` names in ``context``). ``backend`` is its key in ``world.backends``."""

    name: str
    model: RewardModel | None = None
    fn: Callable | None = None
    tokenizer: object = None
    backend: str | None = None
    context: tuple[str, ...] = ()


def _check_reward_fn(fn, name: str) -> None:
    """`ValueError` unless `fn` can be a batched reward function (named `name` in the message)."""
    if not callable(fn):
        raise ValueError(f"{name} must be callable: {PER_ITEM_HINT}")
    if isinstance(getattr(fn, "__self__", None), Task) and getattr(fn, "__name__", "") == "gold":
        raise ValueError(f"{name}=task.gold scores one response; the batched gold reward is task.gold_reward "
                         f"({PER_ITEM_HINT})")


def named_rewards(rewards) -> list[tuple[str, object]]:
    """``rewards=`` as ``[(name, source)]``: a dict keeps its names, a list or tuple is named "r0", "r1", ... in
    order. `ValueError` for anything else, an empty one, a name that is not a non-empty string, or a source that is
    neither a reward model (a module or a local folder) nor a batched reward function."""
    if isinstance(rewards, Mapping):
        items = list(rewards.items())
    elif isinstance(rewards, (list, tuple)):
        items = [(f"r{i}", source) for i, source in enumerate(rewards)]
    else:
        raise ValueError(f"rewards must be a dict {{name: reward model or function}} or a list of them, got "
                         f"{type(rewards).__name__}")
    if not items:
        raise ValueError("rewards is empty: pass at least one reward model or reward function")
    for name, source in items:
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"rewards: names must be non-empty strings without '/' (they become info and metric "
                             f"keys such as score/<name>), got {name!r}")
        if not isinstance(source, (nn.Module, str, Path)):
            _check_reward_fn(source, f"rewards[{name!r}]")
    return items


def check_options(options) -> None:
    """`ValueError` naming ``options`` unless it is a dict (any mapping) or None."""
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"options must be a dict or None, got {type(options).__name__} {options!r}")


class RLHFWorld:
    """Everything an RLHF episode needs, shared by the single and the vector env: the task, tokenizer, acting
    policy π, frozen reference π_ref, reward model or function, the KL coefficient and the reward arithmetic.

    Arguments are those of `rlhf_env.env.RLHFEnv` (see its docstring). How each model runs is decided here, once
    (``backends``: ``"gpt2"``, ``"llama"`` or ``"hf"`` per model, `rlhf_env.models.choose_backend`); a model not
    on ``"gpt2"`` is checked to be decodable (`rlhf_env.models.UnsupportedModel` otherwise).
    """

    def __init__(
        self,
        task: str | Task = DEFAULT_TASK,
        policy=None,
        reference=None,
        reward_model=None,
        reward_fn=None,
        tokenizer=None,
        beta: float = 0.1,
        kl_target: float | None = None,
        kl_horizon: int = 10000,
        kl_batch_episodes: int = 64,
        kl_estimator: str = "k1",
        kl_mode: str = "policy",
        max_new_tokens: int | None = None,
        temperature: float = 1.0,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        missing_eos_penalty: float = 0.0,
        nonfinite_reward: str = "raise",
        compact_at: int | None = None,
        backend: str = "auto",
        trust_remote_code: bool = False,
        reward_tokenizer=None,
        rewards=None,
        reward_weights=None,
        lora=None,
        end_of_turn: str | int | None = None,
    ):
        self.task = get_task(task)
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown KL estimator {kl_estimator!r}; expected one of {KL_ESTIMATORS}")
        if kl_mode not in KL_MODES:
            raise ValueError(f"kl_mode must be one of {KL_MODES}, got {kl_mode!r}")
        if kl_mode != "policy" and policy is not None:
            raise ValueError(f"kl_mode={kl_mode!r} holds no acting policy: the agent brings its own; drop policy=")
        if kl_mode == "reference" and (kl_estimator != "k1" or kl_target is not None):
            raise ValueError("kl_mode='reference' does not see log π, so it needs kl_estimator='k1' and a fixed "
                             "beta (no kl_target)")
        if nonfinite_reward not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite_reward must be 'raise' or 'mask', got {nonfinite_reward!r}")
        if reward_model is not None and reward_fn is not None:
            raise ValueError("pass a reward_model or a reward_fn, not both")
        if rewards is not None and (reward_model is not None or reward_fn is not None):
            raise ValueError("pass rewards= (several rewards) or reward_model= / reward_fn= (one reward), not both")
        if rewards is not None and reward_tokenizer is not None:
            raise ValueError("reward_tokenizer= belongs to reward_model=; a reward model in rewards= reads with the "
                             "tokenizer saved in its folder (or its RewardModel.tokenizer)")
        if reward_weights is not None and rewards is None:
            raise ValueError("reward_weights= weighs the rewards of rewards=; this env has a single reward")
        if reward_fn is not None:
            _check_reward_fn(reward_fn, "reward_fn")
        if lora is not None:
            if kl_mode != "policy":
                raise ValueError(f"lora= adapts the env's acting policy; kl_mode={kl_mode!r} holds none")
            if not is_lora_config(lora):
                require_peft()
                raise ValueError(f"lora must be a peft.LoraConfig or None, got {type(lora).__name__}")
            if is_peft_model(policy):
                raise ValueError("policy= is already a PeftModel: drop lora= (or pass the base model with lora=)")
        components = None if rewards is None else named_rewards(rewards)
        for name, value in (("temperature", temperature), ("beta", beta), ("kl_target", kl_target)):
            if value is not None and not _is_real(value):
                raise ValueError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if not _is_real(missing_eos_penalty) or not fits_float32(float(missing_eos_penalty)):
            raise ValueError(f"missing_eos_penalty must be a number finite in float32 (|x| ≤ 3.4e38), got "
                             f"{missing_eos_penalty!r}")
        if not isinstance(trust_remote_code, bool):
            raise ValueError(f"trust_remote_code must be True or False, got {trust_remote_code!r}")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype (e.g. torch.bfloat16) or None, got {dtype!r}")
        kl_horizon = checked_integer("kl_horizon", kl_horizon)
        kl_batch_episodes = checked_integer("kl_batch_episodes", kl_batch_episodes)
        max_new_tokens = None if max_new_tokens is None else checked_integer("max_new_tokens", max_new_tokens)
        compact_at = None if compact_at is None else checked_integer("compact_at", compact_at)
        if kl_target is not None and kl_batch_episodes > kl_horizon:
            raise ValueError(f"kl_batch_episodes ({kl_batch_episodes}) must not exceed kl_horizon ({kl_horizon}): β "
                             f"moves by up to 0.2·batch/horizon per batch")
        self.device = resolve_device(device)
        self.kl_estimator, self.kl_mode, self.temperature = kl_estimator, kl_mode, float(temperature)
        self.missing_eos_penalty, self.nonfinite_reward = float(missing_eos_penalty), nonfinite_reward
        self.kl_controller = (FixedKLController(beta) if kl_target is None
                              else AdaptiveKLController(beta, kl_target, kl_horizon))
        self.kl_batch_episodes = kl_batch_episodes
        self._kl_batch: list[float] = []  # KL sums of finished episodes that have not moved β yet
        self._beta_frozen = False
        single_model = reward_model if reward_fn is None and components is None else False
        self.tokenizer, self.policy, self.reference, self.reward_model = self._load(
            policy, reference, single_model, tokenizer, dtype, trust_remote_code, lora)
        # Conversation prompts need the tokenizer's chat template: refused here, before any model runs.
        chat = any(is_conversation(p) for p in self.task.train_prompts() + self.task.eval_prompts())
        if chat:
            require_chat_template(self.tokenizer, f"a prompt of task {self.task.name!r}")
        self.reward_fn = reward_fn
        self._backend = backend  # as asked: models swapped in later (set_reward_model) choose theirs the same way
        self.backends = {name: choose_backend(model, backend) for name, model in
                         (("policy", self.policy), ("reference", self.reference)) if model is not None}
        if self.reward_model is not None:
            self.backends["reward_model"] = choose_backend(self.reward_model.trunk, backend)
        # The reward model's own tokenizer when it is not the policy's (None: the env's ids pass straight through).
        self.reward_tokenizer = self._reward_tokenizer(reward_tokenizer, self.reward_model, trust_remote_code)
        # What scores an episode: the single reward of reward_model= / reward_fn= (its score is the source's), or
        # the named rewards of rewards= (score = Σ w_i·r_i, each r_i reported as score/<name>).
        self.named_rewards = components is not None
        if components is None:
            self.reward_sources = [RewardSource("reward_fn", fn=reward_fn, context=context_names(reward_fn))
                                   if reward_fn is not None else
                                   RewardSource("reward_model", model=self.reward_model,
                                                tokenizer=self.reward_tokenizer, backend="reward_model")]
        else:
            self.reward_sources = []
            for name, source in components:
                if not isinstance(source, (nn.Module, str, Path)):
                    self.reward_sources.append(RewardSource(name, fn=source, context=context_names(source)))
                    continue
                model = self._load_reward_model(source, dtype, trust_remote_code)
                key = f"reward_model/{name}"
                self.backends[key] = choose_backend(model.trunk, backend)
                self.reward_sources.append(RewardSource(name, model=model, backend=key,
                                                        tokenizer=self._reward_tokenizer(None, model,
                                                                                         trust_remote_code)))
        self._weights = (1.0,) * len(self.reward_sources)  # the weights new episodes start with, in source order
        if reward_weights is not None:
            self._weights = self._checked_weights(reward_weights, "reward_weights")
        for name in ("policy", "reference"):
            if self.backends.get(name) in ("hf", "llama"):
                check_decodable(getattr(self, name), name)
        self.agent = None  # kl_mode="agent": what reports log π(a|s) (`attach_agent`)
        self.max_new_tokens = self.task.max_new_tokens if max_new_tokens is None else max_new_tokens
        self.vocab_size = self.reference.get_output_embeddings().weight.shape[0]
        if self.policy is not None and self.policy.get_output_embeddings().weight.shape[0] != self.vocab_size:
            raise ValueError("policy and reference have different vocabularies")
        if len(self.tokenizer) > self.vocab_size:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but the models only "
                             f"{self.vocab_size} logits")
        for source in self.reward_sources:
            if source.model is not None:
                self._check_vocabulary(source.name, source.model, source.tokenizer)
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token: episodes end at EOS, so the env needs one")
        # Episodes end at EOS and, for a chat task (or when given), at the end-of-turn token.
        self.end_of_turn_id = self._end_of_turn(end_of_turn, chat)
        self.stop_token_ids = tuple(dict.fromkeys(token for token in (self.tokenizer.eos_token_id,
                                                                      self.end_of_turn_id) if token is not None))
        # The prompt plus the response must fit every model the env runs.
        read_through_ids = [(f"reward model {s.name!r}" if self.named_rewards else "reward model", s.model.trunk)
                            for s in self.reward_sources if s.model is not None and s.tokenizer is None]
        contexts = {name: getattr(getattr(model, "config", None), "max_position_embeddings", None) for name, model in
                    [("policy", self.policy), ("reference", self.reference), *read_through_ids]
                    if model is not None}
        contexts = {name: int(c) for name, c in contexts.items() if c is not None}
        shortest = min(contexts, key=contexts.get)
        context = contexts[shortest]
        if context - self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} leaves no room for a prompt in the {shortest}'s "
                             f"context of {context} tokens (contexts: {contexts})")
        prompts = self.task.train_prompts() + self.task.eval_prompts()
        # The task's queries, tokenized once: resets then cost a dictionary lookup, not a tokenizer call.
        self._queries = dict(zip(map(prompt_key, prompts),
                                 encode_prompts(self.tokenizer, prompts, context - self.max_new_tokens)))
        self.max_prompt_tokens = max(len(q) for q in self._queries.values())
        self._train_prompts, self._eval_prompts = self.task.train_prompts(), self.task.eval_prompts()
        width = self.max_prompt_tokens + self.max_new_tokens
        # The vector env's cache is compacted once it is twice as wide as the widest live episode can be.
        self.compact_at = int(compact_at or 2 * width)
        # A tokenizer without a pad token (GPT-2's) pads with EOS here: padding is always masked (the observations
        # and every forward carry an attention mask), and the user's tokenizer is left as it is.
        self.eos_token_id = self.tokenizer.eos_token_id
        self.pad_token_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                             else self.eos_token_id)
        self.action_space = spaces.Discrete(self.vocab_size)
        self.observation_space = spaces.Dict({
            "input_ids": spaces.Box(0, self.vocab_size - 1, shape=(width,), dtype=np.int64),
            "attention_mask": spaces.Box(0, 1, shape=(width,), dtype=np.int64),
        })

    def episode_batch(self, batch: int) -> EpisodeBatch:
        """`batch` rows of live episodes with one decoder for π and π_ref (π_ref alone without an acting policy)."""
        names = ["policy", "reference"] if self.policy is not None else ["reference"]
        decoder = BatchedDecoder([getattr(self, name) for name in names], [self.backends[name] for name in names],
                                 batch, self.temperature, self.pad_token_id, self.compact_at)
        return EpisodeBatch(decoder, self.policy is not None, self.max_prompt_tokens, self.max_new_tokens,
                            self.pad_token_id, self.stop_token_ids)

    def start_episode(self, episodes: EpisodeBatch, row: int, prompt: str, query: list[int]) -> None:
        """Begin an episode in `row` of `episodes`, recording the reward weights in force now: it is scored with
        them when it ends, whatever `set_reward_weights` does meanwhile."""
        episodes.start(row, prompt, query, self._weights)

    def _load(self, policy, reference, reward_model, tokenizer, dtype, trust_remote_code=False, lora=None):
        """Resolve models given as objects, local paths or None (the task's shipped assets); paths load by
        `rlhf_env.models.load_causal_lm` / `load_tokenizer` rules. A LoRA policy (``lora=``, or a `PeftModel` as
        ``policy=``) without ``reference=`` gets the same base with its adapters off as reference
        (`rlhf_env.lora.AdaptersOff`): the base weights are loaded once."""
        from rlhf_env.assets import asset_dir

        assets = asset_dir(self.task)
        # A LoRA policy without reference= brings its own: its base with the adapters off.
        derived_reference = reference is None and (lora is not None or is_peft_model(policy))
        need_assets = ((policy is None and self.kl_mode == "policy") or (reference is None and not derived_reference)
                       or reward_model is None or tokenizer is None)
        if need_assets and not (assets / "manifest.json").is_file():
            raise ValueError(f"task {self.task.name!r} has no shipped assets: build them with `python -m "
                             f"rlhf_env.assets build --task {self.task.name}` or pass every model explicitly")

        def causal_lm(given, default_dir):
            if given is None:
                given = default_dir
            if isinstance(given, (str, Path)):
                return load_causal_lm(given, device=self.device, dtype=dtype, trust_remote_code=trust_remote_code)
            return given.to(self.device).eval()

        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer or assets / "tokenizer", trust_remote_code=trust_remote_code)
        policy = causal_lm(policy, assets / "policy") if self.kl_mode == "policy" else None
        if lora is not None:
            policy = wrap_policy(policy, lora)
        if is_peft_model(policy):
            check_lora_policy(policy, derived_reference=reference is None)
        reference = AdaptersOff(policy) if reference is None and is_peft_model(policy) else causal_lm(
            reference, assets / "policy")
        if reference is policy:
            raise ValueError("policy and reference must be different objects (the reference stays frozen)")
        for p in reference.parameters():
            p.requires_grad_(False)
        if reward_model is False:  # a reward function (or rewards=) replaces the single RM
            reward_model = None
        else:
            given = assets / "reward_model" if reward_model is None else reward_model
            reward_model = self._load_reward_model(given, dtype, trust_remote_code)
        return tokenizer, policy, reference, reward_model

    def _load_reward_model(self, given, dtype, trust_remote_code: bool) -> RewardModel:
        """A reward model given as a `RewardModel`, a transformers sequence classifier (num_labels=1) or a local
        folder (`RewardModel.from_pretrained`), on the world's device, in eval mode."""
        if isinstance(given, (str, Path)):
            return RewardModel.from_pretrained(given, device=self.device, dtype=dtype,
                                               trust_remote_code=trust_remote_code)
        if isinstance(given, PreTrainedModel):  # a transformers sequence classifier (num_labels=1)
            return RewardModel.from_classifier(given).to(self.device).eval()
        return given.to(self.device).eval()

    def _reward_tokenizer(self, given, reward_model, trust_remote_code: bool):
        """`reward_model`'s tokenizer when it differs from the policy's, else None (ids pass through): `given`
        (an object or a local folder), else the one the reward model carries (saved in its folder)."""
        if reward_model is None:
            if given is not None:
                raise ValueError("reward_tokenizer= is the reward model's tokenizer; this env has a reward_fn")
            return None
        if isinstance(given, (str, Path)):
            given = load_tokenizer(given, trust_remote_code=trust_remote_code)
        tokenizer = given if given is not None else getattr(reward_model, "tokenizer", None)
        probes = [prompt_text(p) for p in self.task.train_prompts()[:1] + self.task.eval_prompts()[:1]]
        if tokenizer is None or same_tokenizer(tokenizer, self.tokenizer, probes):
            return None
        return tokenizer

    def _which(self, name: str) -> str:
        return f"reward model {name!r}" if self.named_rewards else "reward model"

    def _check_vocabulary(self, name: str, model: RewardModel, tokenizer) -> None:
        """`ValueError` unless the reward model `name` can read every response: through the policy's ids (its
        vocabulary covers the policy's actions) or through its own `tokenizer` (whose ids it embeds)."""
        which, rm_vocab = self._which(name), model.trunk.get_input_embeddings().weight.shape[0]
        if tokenizer is None and rm_vocab < self.vocab_size:
            raise ValueError(f"the {which}'s vocabulary ({rm_vocab} embedding rows) is smaller than the "
                             f"policy's ({self.vocab_size} actions): it cannot read every response")
        if tokenizer is not None and len(tokenizer) > rm_vocab:
            raise ValueError(f"the {which}'s tokenizer has {len(tokenizer)} tokens but the {which} "
                             f"only {rm_vocab} embedding rows")

    def set_reward_model(self, reward_model, name: str | None = None) -> None:
        """Score episodes with `reward_model` from now on: a new version of the env's reward model (an iterated
        reward model retrained on fresh labels), given as for ``reward_model=`` (a
        `RewardModel`, a transformers sequence classifier, or a local folder; trust_remote_code stays off).

        `name` picks the reward of ``rewards=`` to replace (None: the single reward model of ``reward_model=``).
        Episodes that end after the call are scored by the new model (our agents call it between rollouts, and a
        rollout resets every row first). `ValueError`, with nothing changed, for an env scored by a reward function,
        an unknown name, or a model that cannot read the env's responses (its vocabulary or context)."""
        if self.named_rewards:
            names = [source.name for source in self.reward_sources if source.model is not None]
            if name not in names:
                raise ValueError(f"set_reward_model: name must be one of the reward models of rewards= {names}, got "
                                 f"{name!r}")
        elif name is not None:
            raise ValueError(f"set_reward_model: this env has a single reward; drop name={name!r}")
        elif self.reward_model is None:
            raise ValueError("set_reward_model: this env is scored by a reward function (reward_fn=), not a reward "
                             "model; build it with reward_model=")
        index = next(i for i, source in enumerate(self.reward_sources) if name is None or source.name == name)
        source = self.reward_sources[index]
        if not isinstance(reward_model, (RewardModel, PreTrainedModel, str, Path)):
            raise ValueError(f"set_reward_model: expected a RewardModel, a sequence classifier or a folder, got "
                             f"{type(reward_model).__name__}")
        dtype = next(source.model.parameters()).dtype
        model = self._load_reward_model(reward_model, dtype, trust_remote_code=False)
        tokenizer = self._reward_tokenizer(None, model, trust_remote_code=False)
        self._check_vocabulary(source.name, model, tokenizer)
        context = getattr(model.config, "max_position_embeddings", None)
        width = self.max_prompt_tokens + self.max_new_tokens
        if tokenizer is None and context is not None and int(context) < width:
            raise ValueError(f"set_reward_model: the new {self._which(source.name)} reads {context} positions, "
                             f"fewer than the env's prompts and responses need ({width})")
        backend = choose_backend(model.trunk, self._backend)
        # Checked; now the change, all at once.
        self.reward_sources[index] = RewardSource(source.name, model=model, tokenizer=tokenizer,
                                                  backend=source.backend)
        self.backends[source.backend] = backend
        if not self.named_rewards:
            self.reward_model, self.reward_tokenizer = model, tokenizer

    @property
    def beta(self) -> float:
        return self.kl_controller.beta

    @property
    def reward_names(self) -> list[str]:
        """The names of the rewards of ``rewards=``, in order ([] for the single reward_model= / reward_fn=)."""
        return [source.name for source in self.reward_sources] if self.named_rewards else []

    @property
    def reward_weights(self) -> dict[str, float]:
        """The weights episodes that start now are scored with, by reward name (a copy)."""
        return {source.name: w for source, w in zip(self.reward_sources, self._weights)}

    def set_reward_weights(self, weights: Mapping[str, float] | Sequence[float]) -> None:
        """New weights for the rewards of ``rewards=``: a dict {name: w} (the names it leaves out keep their weight)
        or a list of one weight per reward, in order. They apply to the episodes that start from now on; a running
        episode keeps the weights it started with. `ValueError` naming the problem (a single-reward env, an unknown
        name, a wrong length, a weight that is not a finite real number), with nothing changed."""
        self._weights = self._checked_weights(weights, "set_reward_weights")

    def _checked_weights(self, weights, what: str) -> tuple[float, ...]:
        """`weights` (a dict by name, or a list in order) as a tuple in source order, or `ValueError`."""
        if not self.named_rewards:
            raise ValueError(f"{what}: this env has a single reward (reward_model= / reward_fn=); weighted rewards "
                             "need rewards={name: reward model or function, ...}")
        names = [source.name for source in self.reward_sources]
        if isinstance(weights, Mapping):
            unknown = [name for name in weights if name not in names]
            if unknown:
                raise ValueError(f"{what}: unknown reward names {unknown}; the rewards are {names}")
            out = dict(zip(names, self._weights)) | dict(weights)
            values = [out[name] for name in names]
        elif isinstance(weights, (list, tuple, np.ndarray)):
            values = list(weights)
            if len(values) != len(names):
                raise ValueError(f"{what}: {len(values)} weights for {len(names)} rewards {names} (one per reward, "
                                 "in order)")
            out = dict(zip(names, values))
        else:
            raise ValueError(f"{what} must be a dict {{name: weight}} or a list of {len(names)} weights, got "
                             f"{type(weights).__name__}")
        for name, value in zip(names, values):
            if not _is_real(value) or not fits_float32(float(value)):
                raise ValueError(f"{what}: the weight of {name!r} must be a finite real number, got {value!r}")
        return tuple(float(value) for value in values)

    def update_beta(self, kls: Sequence[float]) -> None:
        """One step of the KL controller for a batch of finished episodes, given their KL sums (nats): an adaptive
        β moves by Ziegler et al.'s rule on the batch's mean KL with ``n_steps = len(kls)`` (`rlhf_env.kl`); a fixed
        β stays. Agents call this once per rollout with the episodes they train on."""
        kls = np.asarray(kls, dtype=np.float64)
        if kls.ndim != 1 or len(kls) == 0:
            raise ValueError(f"update_beta needs a non-empty list of episode KLs, got {kls.tolist()}")
        self.kl_controller.update(float(kls.mean()), n_steps=len(kls))

    def record_episode_kls(self, kls: Sequence[float]) -> None:
        """Finished episodes' KL sums, as the envs see them end: β moves once per `kl_batch_episodes` of them
        (unless inside `beta_frozen`)."""
        if self._beta_frozen:
            return
        self._kl_batch.extend(kls)
        n = self.kl_batch_episodes
        while len(self._kl_batch) >= n:
            self.update_beta(self._kl_batch[:n])  # if the controller refuses (a NaN KL), the batch stays pending
            del self._kl_batch[:n]

    @contextlib.contextmanager
    def beta_frozen(self):
        """Episodes that finish inside this block do not move β: evaluation, and agents, which feed β once per
        rollout with the episodes they keep (`update_beta`), not the discarded ones of idle rows."""
        frozen, self._beta_frozen = self._beta_frozen, True
        try:
            yield
        finally:
            self._beta_frozen = frozen

    def prompt_pool(self, split: str = "train") -> list[str]:
        """The task's prompts of `split` ("train" or "eval"), in the order the env draws from."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return self._train_prompts if split == "train" else self._eval_prompts

    def draw_prompt(self, options: dict | None, rng: np.random.Generator) -> tuple[str | list[dict], list[int]]:
        """The prompt (text or conversation, query ids) for a reset with `options`, drawn with `rng` unless pinned
        (`ValueError` for bad options, `rlhf_env.chat.NoChatTemplate` for a conversation without a chat template,
        before `rng` draws). A conversation is returned as a copy: the task's own is never handed out."""
        check_options(options)
        options = dict(options or {})
        unknown = set(options) - RESET_OPTIONS
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; expected some of {sorted(RESET_OPTIONS)}")
        split = options.get("split", "train")
        if split not in ("train", "eval"):
            raise ValueError(f"reset option 'split' must be 'train' or 'eval', got {split!r}")
        if "prompt" in options:
            prompt = options["prompt"]
            if not isinstance(prompt, str) and not is_conversation(prompt):
                raise ValueError(f"reset option 'prompt' must be a string or {CONVERSATION}, got "
                                 f"{type(prompt).__name__}")
            if is_conversation(prompt):
                prompt = check_prompt(prompt, "reset option 'prompt'")
                require_chat_template(self.tokenizer, "reset option 'prompt'")
        else:
            pool = self._train_prompts if split == "train" else self._eval_prompts
            prompt = pool[int(rng.integers(len(pool)))]
        query = self._queries.get(prompt_key(prompt))
        if query is None:
            query = encode_prompts(self.tokenizer, [prompt], self.max_prompt_tokens)[0]
        if is_conversation(prompt):
            prompt = [dict(message) for message in prompt]
        return prompt, query

    def attach_agent(self, agent) -> None:
        """kl_mode="agent": `agent.action_logprobs(observations, actions)` gives log π(a|s) of the acting policy."""
        if self.kl_mode != "agent":
            raise ValueError(f"attach_agent needs kl_mode='agent' (this env has kl_mode={self.kl_mode!r})")
        if not callable(getattr(agent, "action_logprobs", None)):
            raise TypeError(f"{type(agent).__name__} has no action_logprobs(observations, actions) method "
                            f"(see rlhf_env.agent.Agent)")
        self.agent = agent

    def agent_logprobs(self, observations: dict, tokens: list[int], rows: list[int]) -> list[float]:
        """log π(a|s) of the attached agent for `tokens` in `observations` (batched), checked on `rows`.

        Raises `RuntimeError` if no agent is attached and `ValueError` for a wrong shape, a NaN or a log-prob
        above 0; either way before the env changes.
        """
        if self.agent is None:
            raise RuntimeError("kl_mode='agent' needs the acting agent: call env.unwrapped.attach_agent(agent) "
                               "before step() (for SB3: SB3VecEnv.attach(model))")
        out = np.asarray(self.agent.action_logprobs(observations, np.asarray(tokens, dtype=np.int64)),
                         dtype=np.float64)
        if out.shape != (len(tokens),):
            raise ValueError(f"action_logprobs must return shape ({len(tokens)},), got {out.shape}")
        checked = out[rows]
        if not np.isfinite(checked).all() or (checked > 1e-5).any():
            raise ValueError(f"action_logprobs must return finite log-probabilities <= 0, got {checked.tolist()}")
        return np.minimum(out, 0.0).tolist()

    def response_texts(self, responses: list[list[int]]) -> list[str]:
        """Responses (token ids, each with the stop token that ended it, if any) as the text rewards and ``task.gold``
        see: the closing EOS or end-of-turn token left out and special tokens skipped, so no template markup."""
        stops = set(self.stop_token_ids)
        return self.tokenizer.batch_decode([r[:-1] if r and r[-1] in stops else r for r in responses],
                                           skip_special_tokens=True)

    def _end_of_turn(self, given, chat: bool) -> int | None:
        """The end-of-turn token's id: `given` (a token string or id), or for a chat task the one its chat template
        closes an assistant turn with (`rlhf_env.chat.detect_end_of_turn`; None: episodes end at EOS only)."""
        if given is None:
            return detect_end_of_turn(self.tokenizer) if chat else None
        if isinstance(given, str):
            token = self.tokenizer.convert_tokens_to_ids(given)
            if not isinstance(token, int) or self.tokenizer.convert_ids_to_tokens(token) != given:
                raise ValueError(f"end_of_turn={given!r} is not a token of the tokenizer (a chat template's "
                                 "end-of-turn token such as '<|im_end|>', or its id)")
        elif isinstance(given, (int, np.integer)) and not isinstance(given, (bool, np.bool_)):
            token = int(given)
        else:
            raise ValueError(f"end_of_turn must be a token (a string), a token id or None, got "
                             f"{type(given).__name__} {given!r}")
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"end_of_turn={given!r} is token id {token}, outside the models' {self.vocab_size} "
                             "actions")
        return token

    def check_action(self, action) -> int:
        """The action as a token id, or `InvalidAction` saying what is wrong (before anything changes)."""
        if isinstance(action, (bool, np.bool_)) or isinstance(action, torch.Tensor):
            raise InvalidAction(f"action must be an integer token id, got {type(action).__name__} {action!r}")
        if isinstance(action, np.ndarray):
            if action.shape != () or not np.issubdtype(action.dtype, np.integer):
                raise InvalidAction(f"action must be an integer token id (a scalar), got an array of shape "
                                    f"{action.shape} and dtype {action.dtype}")
            action = action.item()
        if not isinstance(action, (int, np.integer)):
            raise InvalidAction(f"action must be an integer token id, got {type(action).__name__} {action!r}")
        if not 0 <= int(action) < self.vocab_size:
            raise InvalidAction(f"action {action} is not a token id in [0, {self.vocab_size})")
        return int(action)

    def score(self, prompts: list[str], queries: list[list[int]], responses: list[list[int]], texts: list[str],
              finished: list[bool]) -> list[float]:
        """Raw scores of finished responses (`texts` decoded, `finished`: ended with EOS), weighted by the current
        weights when the env has several rewards (`score_components`). Changes nothing; NaN/inf are returned for
        the caller to check."""
        return self.weighted(self.score_components(prompts, queries, responses, texts, finished))

    @torch.no_grad()
    def score_components(self, prompts: list[str], queries: list[list[int]], responses: list[list[int]],
                         texts: list[str], finished: list[bool]) -> dict[str, list[float]]:
        """Each reward's raw scores of the responses, by reward name: one batched forward per reward model
        (`score_with_model`), one call per batched reward function (`rlhf_env.reward.call_reward_fn`: `TypeError` /
        `ValueError` naming it for a value that is not one real number per response). Changes nothing."""
        if not prompts:
            return {source.name: [] for source in self.reward_sources}
        out = {}
        for source in self.reward_sources:
            if source.fn is not None:
                context = {"query_ids": queries, "response_ids": responses, "finished": finished, "task": self.task}
                out[source.name] = call_reward_fn(source.fn, prompts, texts, context, source.context)
            else:
                out[source.name] = self.score_with_model(source, queries, responses)
        return out

    def score_with_model(self, source: RewardSource, queries: list[list[int]],
                         responses: list[list[int]]) -> list[float]:
        """One batched forward of the reward model of `source` over the responses: the policy's ids as they are,
        or, for a reward model with its own tokenizer, the decoded text re-encoded by it."""
        backend = self.backends[source.backend]
        if source.tokenizer is not None:  # the RM reads the text, as its own tokenizer encodes it
            text = self.tokenizer.batch_decode([q + r for q, r in zip(queries, responses)], skip_special_tokens=True)
            context = getattr(source.model.config, "max_position_embeddings", None)
            ids, mask = encode_for_reward_model(source.tokenizer, text, context, self.device)
            return source.model.score_sequences(ids, mask, backend=backend).tolist()
        pad = self.pad_token_id
        query_ids, query_mask = pad_left(queries, pad, self.device)
        response_ids, response_mask = pad_right(responses, pad, device=self.device)
        return source.model.score(query_ids, query_mask, response_ids, response_mask, backend=backend).tolist()

    def weighted(self, components: dict[str, list[float]],
                 weights: Sequence[tuple[float, ...] | None] | None = None) -> list[float]:
        """Σ_i w_i·r_i per response, with each response's weights (``weights[j]``, None: the current ones); the
        single reward of reward_model= / reward_fn= is returned as it is."""
        columns = [components[source.name] for source in self.reward_sources]
        if not self.named_rewards:
            return list(columns[0])
        weights = [None] * len(columns[0]) if weights is None else weights
        return [float(sum(w * r for w, r in zip(self._weights if ws is None else ws, rs)))
                for ws, rs in zip(weights, zip(*columns))]

    def check_components(self, components: dict[str, list[float]], index: int, prompt: str, text: str) -> None:
        """Under ``nonfinite_reward="raise"``, `NonFiniteReward` naming the first reward whose score of response
        `index` is not finite in float32 (a weighted sum would hide which); nothing under "mask"."""
        if not self.named_rewards or self.nonfinite_reward != "raise":
            return
        for name, values in components.items():
            if not fits_float32(values[index]):
                raise NonFiniteReward(f"the reward {name!r} returned {values[index]}{self._context(prompt, text)}")

    def checked_score(self, score: float, prompt: str, text: str) -> tuple[float, bool]:
        """`rlhf_env.reward.checked_score` under this world's ``nonfinite_reward``: ``(score, masked)``."""
        return checked_score(score, self.nonfinite_reward, self._context(prompt, text))

    def _context(self, prompt: str, text: str) -> str:
        source = (f"rewards {self.reward_names}" if self.named_rewards
                  else "reward function" if self.reward_fn else "reward model")
        return f" ({source}; prompt {prompt!r}, response {text!r})"

    def pay_rows(self, episodes: EpisodeBatch, rows: list[int], tokens: list[int], logprobs: list[float],
                 ref_logprobs: list[float]) -> tuple[dict[str, np.ndarray], dict[int, dict]]:
        """What appending ``tokens[i]`` to the episode in ``rows[i]`` pays, computed and checked **without changing
        anything** (`commit_rows` then records it): the step's info over `rows` as arrays (``logprob``,
        ``ref_logprob``, ``kl``, ``beta``, ``non_score_reward`` = −β·KL_t, ``reward``, ``terminated``,
        ``finished``), where ``reward`` already holds the terminal reward of the rows whose episode ends, and
        those rows' end-of-episode info by row (`end_episodes`).

        Raises, with the env as it was: `NonFiniteReward` for a token KL/reward that is not finite in float32, or a
        non-finite score under ``nonfinite_reward="raise"``; `TypeError` for a reward_fn or task.gold value that is
        not a real number; whatever the reward function, reward model or task.gold raise.
        """
        kl, reward = token_reward(np.array(logprobs), np.array(ref_logprobs), self.beta, self.kl_estimator)
        check_token_rewards(kl, reward, logprobs, ref_logprobs, rows)
        lengths = np.array([len(episodes.responses[row]) + 1 for row in rows], dtype=np.int64)
        finished = np.isin(np.array(tokens, dtype=np.int64), self.stop_token_ids)
        terminated = finished | (lengths == self.max_new_tokens)
        step = {"logprob": np.array(logprobs, dtype=np.float64), "ref_logprob": np.array(ref_logprobs, np.float64),
                "kl": kl, "beta": np.full(len(rows), self.beta), "non_score_reward": reward,
                "reward": reward.copy(), "terminated": terminated, "finished": finished}
        ended = np.flatnonzero(terminated).tolist()
        ends = self.end_episodes([episodes.prompts[rows[i]] for i in ended],
                                 [episodes.queries[rows[i]] for i in ended],
                                 [episodes.responses[rows[i]] + [tokens[i]] for i in ended],
                                 [episodes.logprobs[rows[i]] + [logprobs[i]] for i in ended],
                                 [episodes.ref_logprobs[rows[i]] + [ref_logprobs[i]] for i in ended],
                                 [bool(finished[i]) for i in ended], [episodes.weights[rows[i]] for i in ended])
        by_row = {}
        for i, (end, terminal) in zip(ended, ends):
            step["reward"][i] += terminal
            if not fits_float32(float(step["reward"][i])):
                raise NonFiniteReward(f"the last token's reward {step['reward'][i]} (−β·KL {reward[i]} + terminal "
                                      f"{terminal}) is not finite in float32"
                                      f"{self._context(end['prompt'], end['response_text'])}")
            del end["prompt"]
            by_row[rows[i]] = end
        return step, by_row

    def commit_rows(self, episodes: EpisodeBatch, rows: list[int], tokens: list[int], logprobs: list[float],
                    ref_logprobs: list[float], ends: dict[int, dict]) -> None:
        """Record a step `pay_rows` computed: append the tokens to their episodes and feed the KL controller the
        KL sums of the episodes that ended (``ends``). The caller then feeds the rows that go on."""
        episodes.append(rows, tokens, logprobs, ref_logprobs)
        self.record_episode_kls([ends[row]["kl_sum"] for row in rows if row in ends])

    def end_episodes(self, prompts: list[str], queries: list[list[int]], responses: list[list[int]],
                     logprobs: list[list[float]], ref_logprobs: list[list[float]],
                     finished: list[bool],
                     weights: Sequence[tuple[float, ...] | None] | None = None) -> list[tuple[dict, float]]:
        """Score finished episodes (one batched call per reward; nothing changes) and return each one's
        end-of-episode info (score, score_nonfinite, gold_score, response_text, length, finished, kl_sum, and its
        prompt; with several rewards also ``score/<name>``, each reward's raw score) with its terminal reward.
        `responses` and the per-token log-probs include the last token; `weights` are each episode's reward
        weights, recorded when it started (None: the current ones)."""
        if not prompts:
            return []
        texts = self.response_texts(responses)
        components = self.score_components(prompts, queries, responses, texts, finished)
        scores = self.weighted(components, weights)
        gold = f"task.gold {callable_name(self.task.gold)}"
        out = []
        for i, (prompt, text, response, score, lp, ref, eos) in enumerate(zip(prompts, texts, responses, scores,
                                                                             logprobs, ref_logprobs, finished)):
            self.check_components(components, i, prompt, text)
            terminal, score, masked = terminal_reward(score, eos, self.missing_eos_penalty, self.nonfinite_reward,
                                                      self._context(prompt, text))
            kl_sum = float(np.sum(kl_estimate(np.array(lp), np.array(ref), self.kl_estimator)))
            info = {"score": score, "score_nonfinite": masked}
            if self.named_rewards:
                info |= {f"score/{name}": float(values[i]) for name, values in components.items()}
            out.append((info | {"gold_score": real_score(self.task.gold(prompt, text), gold, prompt),
                                "response_text": text, "length": len(response), "finished": eos, "kl_sum": kl_sum,
                                "prompt": prompt}, terminal))
        return out


class WorldParts:
    """The world's parts, for agents and users of both envs: ``env.unwrapped.policy`` is the acting policy."""

    world: RLHFWorld
    task = property(lambda self: self.world.task)
    tokenizer = property(lambda self: self.world.tokenizer)
    policy = property(lambda self: self.world.policy)
    reference = property(lambda self: self.world.reference)
    reward_model = property(lambda self: self.world.reward_model)
    beta = property(lambda self: self.world.beta)
    reward_weights = property(lambda self: self.world.reward_weights)

    def set_reward_weights(self, weights) -> None:
        """New weights for the rewards of ``rewards=``, from the next episode on (`RLHFWorld.set_reward_weights`)."""
        self.world.set_reward_weights(weights)

    def set_reward_model(self, reward_model, name: str | None = None) -> None:
        """Score the episodes that end from now on with `reward_model` (`RLHFWorld.set_reward_model`)."""
        self.world.set_reward_model(reward_model, name)

    def update_beta(self, kls: Sequence[float]) -> None:
        """One KL-controller step for a batch of finished episodes' KL sums (`RLHFWorld.update_beta`)."""
        self.world.update_beta(kls)

    def beta_frozen(self):
        """A block in which finished episodes do not move β (`RLHFWorld.beta_frozen`)."""
        return self.world.beta_frozen()

    def attach_agent(self, agent) -> None:
        """kl_mode="agent": the agent whose ``action_logprobs`` the env asks for log π(a|s) at every step."""
        self.world.attach_agent(agent)

    _failed: BaseException | None = None  # an error that struck while a step or reset was being committed

    def _check_not_failed(self) -> None:
        """`ResetNeeded` naming the error if an earlier step or reset failed half-way (a model forward raised)."""
        if self._failed is not None:
            raise ResetNeeded(f"an earlier step or reset failed while the env was changing "
                              f"({type(self._failed).__name__}: {self._failed}); call reset()") from self._failed

    def _require_acting_policy(self) -> None:
        if self.world.policy is None:
            raise RuntimeError(f"kl_mode={self.world.kl_mode!r}: the env holds no acting policy, so it has no "
                               "next_token_logprobs (the agent samples from its own policy)")
