"""The token-level RLHF environment (single episode at a time).

Legend: ``P`` query tokens (padded to the longest prompt of the task), ``T`` = max_new_tokens, ``V`` actions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.error import InvalidAction, ResetNeeded

from rlhf_env.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_estimate
from rlhf_env.lm import pad_left, pad_right
from rlhf_env.models import load_causal_lm, resolve_device
from rlhf_env.reward_model import RewardModel
from rlhf_env.rollout import RolloutBatch
from rlhf_env.tasks import DEFAULT_TASK, Task, get_task
from rlhf_env.text import encode_prompts

RESET_OPTIONS = frozenset({"prompt", "split"})
KL_MODES = ("policy", "agent", "reference")


class NonFiniteReward(ValueError):
    """The reward model or reward function returned NaN or ±inf."""


class RLHFWorld:
    """Everything an RLHF episode needs, shared by the single and the vector env: the task, tokenizer, acting
    policy π, frozen reference π_ref, reward model or function, the KL coefficient and the reward arithmetic.

    Arguments are those of `RLHFEnv` (see its docstring).
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
        if nonfinite_reward not in ("raise", "mask"):
            raise ValueError(f"nonfinite_reward must be 'raise' or 'mask', got {nonfinite_reward!r}")
        if reward_model is not None and reward_fn is not None:
            raise ValueError("pass a reward_model or a reward_fn, not both")
        if reward_fn is not None and not callable(reward_fn):
            raise ValueError("reward_fn must be callable as reward_fn(prompt, response) -> float")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if not math.isfinite(missing_eos_penalty):
            raise ValueError(f"missing_eos_penalty must be finite, got {missing_eos_penalty}")
        if isinstance(kl_horizon, bool) or not isinstance(kl_horizon, int) or kl_horizon < 1:
            raise ValueError(f"kl_horizon must be a positive integer (episodes), got {kl_horizon!r}")
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                           or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be None (the task's) or an integer ≥ 1, got {max_new_tokens!r}")
        if isinstance(kl_batch_episodes, bool) or not isinstance(kl_batch_episodes, int) or kl_batch_episodes < 1:
            raise ValueError(f"kl_batch_episodes must be a positive integer, got {kl_batch_episodes!r}")
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
        self.tokenizer, self.policy, self.reference, self.reward_model = self._load(
            policy, reference, reward_model if reward_fn is None else False, tokenizer, dtype)
        self.reward_fn = reward_fn
        self.agent = None  # kl_mode="agent": what reports log π(a|s) (`attach_agent`)
        self.max_new_tokens = self.task.max_new_tokens if max_new_tokens is None else max_new_tokens
        self.vocab_size = self.reference.get_output_embeddings().weight.shape[0]
        if self.policy is not None and self.policy.get_output_embeddings().weight.shape[0] != self.vocab_size:
            raise ValueError("policy and reference have different vocabularies")
        if len(self.tokenizer) > self.vocab_size:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but the models only "
                             f"{self.vocab_size} logits")
        context = int(self.reference.config.max_position_embeddings)
        prompts = self.task.train_prompts() + self.task.eval_prompts()
        # The task's queries, tokenized once: resets then cost a dictionary lookup, not a tokenizer call.
        self._queries = dict(zip(prompts, encode_prompts(self.tokenizer, prompts, context - self.max_new_tokens)))
        self.max_prompt_tokens = max(len(q) for q in self._queries.values())
        self._train_prompts, self._eval_prompts = self.task.train_prompts(), self.task.eval_prompts()
        width = self.max_prompt_tokens + self.max_new_tokens
        # The vector env's cache is compacted once it is twice as wide as the widest live episode can be.
        self.compact_at = int(compact_at or 2 * width)
        self.eos_token_id, self.pad_token_id = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        self.action_space = spaces.Discrete(self.vocab_size)
        self.observation_space = spaces.Dict({
            "input_ids": spaces.Box(0, self.vocab_size - 1, shape=(width,), dtype=np.int64),
            "attention_mask": spaces.Box(0, 1, shape=(width,), dtype=np.int64),
        })

    def _load(self, policy, reference, reward_model, tokenizer, dtype):
        """Resolve models given as objects, paths or None (the task's shipped assets)."""
        from rlhf_env.assets import asset_dir

        assets = asset_dir(self.task)
        need_assets = ((policy is None and self.kl_mode == "policy") or reference is None or reward_model is None
                       or tokenizer is None)
        if need_assets and not (assets / "manifest.json").is_file():
            raise ValueError(f"task {self.task.name!r} has no shipped assets: build them with `python -m "
                             f"rlhf_env.assets build --task {self.task.name}` or pass every model explicitly")

        def causal_lm(given, default_dir):
            if given is None:
                given = default_dir
            if isinstance(given, (str, Path)):
                return load_causal_lm(given, device=self.device, dtype=dtype)
            return given.to(self.device).eval()

        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer or assets / "tokenizer")
        policy = causal_lm(policy, assets / "policy") if self.kl_mode == "policy" else None
        reference = causal_lm(reference, assets / "policy")
        if reference is policy:
            raise ValueError("policy and reference must be different objects (the reference stays frozen)")
        for p in reference.parameters():
            p.requires_grad_(False)
        if reward_model is False:  # a reward function replaces the RM
            reward_model = None
        elif reward_model is None or isinstance(reward_model, (str, Path)):
            reward_model = RewardModel.from_pretrained(reward_model or assets / "reward_model", device=self.device,
                                                       dtype=dtype)
        else:
            reward_model = reward_model.to(self.device).eval()
        return tokenizer, policy, reference, reward_model

    @property
    def beta(self) -> float:
        return self.kl_controller.beta

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

    def draw_prompt(self, options: dict | None, rng: np.random.Generator) -> tuple[str, list[int]]:
        """The prompt (text, query ids) for a reset with `options`, drawn with `rng` unless pinned."""
        options = dict(options or {})
        unknown = set(options) - RESET_OPTIONS
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; expected some of {sorted(RESET_OPTIONS)}")
        split = options.get("split", "train")
        if split not in ("train", "eval"):
            raise ValueError(f"reset option 'split' must be 'train' or 'eval', got {split!r}")
        if "prompt" in options:
            prompt = options["prompt"]
            if not isinstance(prompt, str):
                raise ValueError(f"reset option 'prompt' must be a string, got {type(prompt).__name__}")
        else:
            pool = self._train_prompts if split == "train" else self._eval_prompts
            prompt = pool[int(rng.integers(len(pool)))]
        if prompt in self._queries:
            return prompt, self._queries[prompt]
        return prompt, encode_prompts(self.tokenizer, [prompt], self.max_prompt_tokens)[0]

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

    @torch.no_grad()
    def score(self, prompts: list[str], queries: list[list[int]], responses: list[list[int]],
              texts: list[str]) -> list[float]:
        """Scores of finished responses: one batched RM forward, or one reward_fn call per response."""
        if self.reward_fn is not None:
            return [float(self.reward_fn(p, t)) for p, t in zip(prompts, texts)]
        pad = self.pad_token_id
        query_ids, query_mask = pad_left(queries, pad, self.device)
        response_ids, response_mask = pad_right(responses, pad, device=self.device)
        return self.reward_model.score(query_ids, query_mask, response_ids, response_mask).tolist()

    def checked_score(self, score: float, prompt: str, text: str) -> tuple[float, bool]:
        """``(score, False)`` for a finite score; for NaN/±inf `NonFiniteReward` (``nonfinite_reward="raise"``) or
        ``(0.0, True)`` (``"mask"``: the flag tells agents and evaluations that this score is not data)."""
        if math.isfinite(score):
            return float(score), False
        if self.nonfinite_reward == "raise":
            raise NonFiniteReward(f"the reward {'function' if self.reward_fn else 'model'} returned {score} "
                                  f"for prompt {prompt!r} and response {text!r}")
        return 0.0, True

    def end_of_episode(self, prompt: str, text: str, score: float, finished: bool, logprobs: list[float],
                       ref_logprobs: list[float]) -> dict:
        """The end-of-episode info: score (checked finite), gold score, text, length and the episode's KL."""
        score, nonfinite = self.checked_score(score, prompt, text)
        info = {"score_nonfinite": nonfinite}
        kl_sum = float(np.sum(kl_estimate(np.array(logprobs), np.array(ref_logprobs), self.kl_estimator)))
        info.update(score=float(score), gold_score=float(self.task.gold(prompt, text)), response_text=text,
                    length=len(logprobs), finished=finished, kl_sum=kl_sum)
        return info


class WorldParts:
    """The world's parts, for agents and users of both envs: ``env.unwrapped.policy`` is the acting policy."""

    world: RLHFWorld
    task = property(lambda self: self.world.task)
    tokenizer = property(lambda self: self.world.tokenizer)
    policy = property(lambda self: self.world.policy)
    reference = property(lambda self: self.world.reference)
    reward_model = property(lambda self: self.world.reward_model)
    beta = property(lambda self: self.world.beta)

    def update_beta(self, kls: Sequence[float]) -> None:
        """One KL-controller step for a batch of finished episodes' KL sums (`RLHFWorld.update_beta`)."""
        self.world.update_beta(kls)

    def beta_frozen(self):
        """A block in which finished episodes do not move β (`RLHFWorld.beta_frozen`)."""
        return self.world.beta_frozen()

    def attach_agent(self, agent) -> None:
        """kl_mode="agent": the agent whose ``action_logprobs`` the env asks for log π(a|s) at every step."""
        self.world.attach_agent(agent)


class RLHFEnv(WorldParts, gym.Env):
    """Text generation as a token-level RL problem with the KL-regularised RLHF reward.

    ## Description
    An episode continues one prompt of a task, one token per step. The reward is the RLHF objective of
    InstructGPT (Ouyang et al. 2022) paid token by token: every step pays −β·KL_t, where KL_t is the KL estimate of
    the chosen token between the acting policy π and the frozen reference π_ref; the last step adds the reward
    model's score of the whole response. The sum over an episode is R(x, y) − β·log(π(y|x)/π_ref(y|x)) with the
    default ``k1`` estimator. A programmatic gold reward is reported beside the proxy score.

    ## The acting policy (the KL seam)
    The env holds the acting policy π (``policy``, a causal LM; by default a fresh copy of the task's π_SFT) and
    computes its next-token distribution once per step with a KV cache, together with π_ref's. An LM agent samples
    its action from ``env.unwrapped.next_token_logprobs`` and trains ``env.unwrapped.policy`` in place between
    episodes: the env's forward is the agent's forward, and KL_t is exact. Any other action is scored under the same
    π. See docs/design.md for the reasons.

    Agents with a policy of their own (an SB3 MLP, a random agent, a user's agent) pass ``kl_mode="agent"`` and
    ``env.unwrapped.attach_agent(agent)``: the env then holds no π and runs no policy forward; at every step it asks
    ``agent.action_logprobs(observations, actions)`` for log π(a_t|s_t) of the action (observations batched, one
    row here) and KL_t is again exact for the policy that acted (`rlhf_env.agent.Agent`; for SB3,
    `rlhf_env.sb3.SB3VecEnv.attach`). ``kl_mode="reference"`` asks nothing: it pays ``β·log π_ref(a_t|s_t)`` per
    token (``info["logprob"]`` is 0, ``info["kl"]`` is ``−log π_ref``) and the agent supplies the other half,
    ``−β·log π(a_t|s_t)``, itself or in expectation as an entropy bonus of β (SB3: ``ent_coef=beta``).

    ## Action Space
    ``Discrete(V)``: the next token id, V = the policy's logit dimension (every action has a log-probability).

    ## Observation Space
    ``Dict(input_ids=Box(0, V−1, (P + T,), int64), attention_mask=Box(0, 1, (P + T,), int64))``: the prompt
    left-padded to P tokens followed by the response so far, right-padded; the mask marks real tokens.

    ## Rewards
    ``r_t = −β·KL_t`` for every step, plus on the last step ``score`` (the RM, or ``reward_fn``) minus
    ``missing_eos_penalty`` if the response hit the token cap without EOS.

    ## Starting State
    A prompt drawn uniformly from the task's train prompts with ``self.np_random`` (``options={"split": "eval"}``
    draws from the held-out prompts; ``options={"prompt": text}`` pins one).

    ## Episode End
    ``terminated=True`` when the policy emits EOS **or** the response reaches ``max_new_tokens`` tokens; the score
    is paid in both cases. The cap ends an episode as a terminal state (never ``truncated``) so that an agent that
    bootstraps on truncation cannot count the score twice. ``truncated`` is always False.

    ## Arguments
    ``task`` (name or `Task`), ``policy`` / ``reference`` (causal LM modules or local paths; default: the task's
    π_SFT), ``reward_model`` (module or path) or ``reward_fn(prompt, response) -> float`` (e.g. ``task.gold`` for
    "PPO-GT" runs), ``tokenizer``, ``beta``, ``kl_target`` (adaptive β when set: Ziegler et al.'s controller, moved
    once per ``kl_batch_episodes`` finished episodes, default 64, by the error of their mean KL, see `rlhf_env.kl`;
    our agents freeze it and move it once per rollout instead), ``kl_horizon`` (episodes),
    ``kl_estimator`` ("k1" or "k3"), ``kl_mode`` ("policy", "agent" or
    "reference", see above), ``max_new_tokens``, ``temperature``, ``device`` ("auto" picks CUDA), ``dtype``,
    ``missing_eos_penalty``, ``nonfinite_reward`` ("raise" or "mask"), ``render_mode`` ("ansi").

    ## Vectorized environment
    ``gym.make_vec("RLHF-v0", num_envs=N)`` returns the native `RLHFVectorEnv`: one batch and one KV cache per
    model for all N rows, one forward per model per step, ``AutoresetMode.NEXT_STEP``. With ``num_envs=1`` it
    reproduces this env exactly (same seed, same actions).

    ## Version History
    * v0 (rlhf-gym 0.2): an adaptive β moves once per ``kl_batch_episodes`` finished episodes by the error of their
      mean KL (it moved after each episode by that episode's); unseeded resets continue the seeded generators.
    * v0: initial version.

    >>> import gymnasium as gym
    >>> import rlhf_env
    >>> env = gym.make("RLHF-v0")
    >>> obs, info = env.reset(seed=0)
    >>> obs["input_ids"].shape == env.observation_space["input_ids"].shape
    True
    >>> eos = env.unwrapped.tokenizer.eos_token_id
    >>> obs, reward, terminated, truncated, info = env.step(eos)
    >>> terminated, truncated, sorted(k for k in info if k in ("score", "gold_score", "kl"))
    (True, False, ['gold_score', 'kl', 'score'])
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None, **world_kwargs):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None")
        self.render_mode = render_mode
        self.world = RLHFWorld(**world_kwargs)
        self.action_space, self.observation_space = self.world.action_space, self.world.observation_space
        self._batch = RolloutBatch(self.world, 1)
        self._last_info: dict = {}

    @property
    def next_token_logprobs(self) -> np.ndarray:
        """log π(· | state) at the env's temperature, ``(V,)``: what an LM agent samples its action from."""
        logprobs = self._batch.policy_logprobs()  # (1, V); an error unless kl_mode="policy"
        if not self._batch.active[0]:
            raise ResetNeeded("no active episode: call reset() first")
        return logprobs[0].cpu().numpy().copy()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        prompt, query = self.world.draw_prompt(options, self.np_random)
        self._batch.start(0, prompt, query)
        self._batch.feed([query], restart=[True])
        self._last_info = {}
        return self._observation(), {"prompt": prompt, "prompt_tokens": len(query)}

    def step(self, action):
        if not self._batch.active[0]:
            raise ResetNeeded("step() called before reset() or after the episode ended; call reset()")
        token = self.world.check_action(action)
        logprobs, ref_logprobs = self._batch.token_logprobs([token])
        if self.world.kl_mode == "agent":
            logprobs = self.world.agent_logprobs(self._batch.observation(slice(0, 1)), [token], [0])
        info = {key: values[0].item() for key, values in
                self._batch.append([0], [token], logprobs[:1], ref_logprobs[:1]).items()}
        if info["terminated"]:
            (end,), (score_reward,) = self._batch.finish([0], [info["finished"]])
            info.update(end)
            info["reward"] += score_reward
        else:
            self._batch.feed([[token]], restart=[False])
        reward, terminated = info.pop("reward"), info.pop("terminated")
        self._last_info = dict(info, reward=reward)
        return self._observation(), float(reward), terminated, False, info

    def render(self):
        if self.render_mode != "ansi":
            return None
        info = self._last_info
        parts = [f"prompt:   {self._batch.prompts[0]}", f"response: {self._batch.response_text(0)}"]
        if "kl" in info:
            parts.append(f"last token: logprob {info['logprob']:.3f}, ref_logprob {info['ref_logprob']:.3f}, "
                         f"kl {info['kl']:.3f}, reward {info['reward']:.3f}")
        if "score" in info:
            parts.append(f"end: score {info['score']:.3f}, gold {info['gold_score']:.3f}, "
                         f"kl_sum {info['kl_sum']:.3f}, length {info['length']}")
        return "\n".join(parts) + "\n"

    def close(self):
        """Free the KV caches and end the episode; the env can be reset and used again."""
        self._batch.release()

    def _observation(self) -> dict:
        return self._batch.observation(0)
