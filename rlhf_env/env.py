"""The token-level RLHF environment (single episode at a time).

Legend: ``P`` query tokens (padded to the longest prompt of the task), ``T`` = max_new_tokens, ``V`` actions.
"""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
from gymnasium.error import ResetNeeded
from gymnasium.utils import seeding

from rlhf_env.world import RLHFWorld, WorldParts, check_seed


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
    ``missing_eos_penalty`` if the response hit the token cap without EOS. With several ``rewards`` the score is
    their weighted sum Σ w_i·r_i, each r_i reported as ``info["score/<name>"]``.

    ## Starting State
    A prompt drawn uniformly from the task's train prompts with ``self.np_random`` (``options={"split": "eval"}``
    draws from the held-out prompts; ``options={"prompt": text}`` pins one). A prompt is a string or a
    conversation, a list of ``{"role", "content"}`` messages (`rlhf_env.chat`), which the tokenizer's chat template
    renders with the generation prompt; a conversation and a tokenizer without a template are refused with
    `rlhf_env.chat.NoChatTemplate` (a `ValueError`) when the env is built (a task's prompts, before any model runs)
    or by the reset that pins one (changing nothing). ``info["prompt"]`` is the prompt as the task gives it (a copy
    of a conversation).

    ## Episode End
    ``terminated=True`` when the policy emits a stop token (EOS, or the end-of-turn token, see ``end_of_turn``)
    **or** the response reaches ``max_new_tokens`` tokens; the score
    is paid in both cases. The cap ends an episode as a terminal state (never ``truncated``) so that an agent that
    bootstraps on truncation cannot count the score twice. ``truncated`` is always False.

    ## Arguments
    ``task`` (name or `Task`), ``policy`` / ``reference`` (causal LM modules or local paths; default: the task's
    π_SFT), ``reward_model`` (a `RewardModel`, a transformers sequence classifier with ``num_labels=1``, or a
    local folder of one, `rlhf_env.reward_model.RewardModel.from_pretrained`: the score is its logit for prompt +
    response, read at the last real token that is not the pad id, minus ``config.reward_offset``) or ``reward_fn``
    (batched, called once per batch of finished episodes: ``fn(prompts, responses, **context) -> one float per
    response``, `rlhf_env.reward`; e.g. ``task.gold_reward`` for "PPO-GT" runs; ``rlhf_env.reward.per_item(f)``
    batches ``f(prompt, response)``), or ``rewards`` (several rewards: a dict ``{name: source}`` or a list of
    sources named "r0", "r1", ...; each source a reward model as for ``reward_model``, with its own tokenizer if it
    carries one, or a batched reward function) with ``reward_weights`` (a dict ``{name: w}``, names left out weigh
    1.0, or a list in order): the score is Σ w_i·r_i, each raw r_i is ``info["score/<name>"]``, and
    ``env.unwrapped.set_reward_weights(weights)`` changes the weights from the next episode on (each episode keeps
    the weights it started with); ``rewards`` with ``reward_model``, ``reward_fn`` or ``reward_tokenizer`` is a
    `ValueError`, and ``env.unwrapped.reward_model`` is then None. ``tokenizer``,
    ``reward_tokenizer`` (the reward model's own tokenizer, an object or a local folder; default: the one saved in
    the reward model's folder, if any. One that does not tokenize like ``tokenizer`` gets the text: finished
    episodes are decoded with ``tokenizer`` and re-encoded with it in one batched call, its special tokens
    included, the prompt cut from the left to fit the reward model's context; otherwise the ids pass through),
    ``beta``, ``kl_target`` (adaptive β when set: Ziegler et al.'s controller, moved once per ``kl_batch_episodes``
    finished episodes, default 64, by the error of their mean KL, see `rlhf_env.kl`; our agents freeze it and move it
    once per rollout instead), ``kl_horizon`` (episodes), ``kl_estimator`` ("k1" or "k3"), ``kl_mode`` ("policy",
    "agent" or "reference", see above), ``max_new_tokens``, ``temperature``, ``device`` ("auto" picks CUDA), ``dtype``,
    ``missing_eos_penalty``, ``nonfinite_reward`` ("raise" or "mask"), ``backend`` ("auto", "gpt2", "llama" or "hf": how
    the models run, decided once, `rlhf_env.models.choose_backend`), ``trust_remote_code`` (default False: applies to
    loading the policy, reference, reward model and tokenizer from local folders; only True lets code shipped in a
    folder, e.g. a tokenizer's ``auto_map``, run), ``lora`` (a ``peft.LoraConfig``, with the optional extra
    ``rlhf-gym[lora]``: the policy is wrapped with LoRA adapters and, without ``reference``, π_ref is the same base with
    the adapters off, its weights shared; a ``peft.PeftModel`` passed as ``policy`` gets the same reference;
    `rlhf_env.lora`), ``end_of_turn`` (a token or token id that ends episodes besides EOS; default None: for a task with
    conversation prompts the token the chat template closes an assistant turn with, such as ``<|im_end|>`` or
    ``<|eot_id|>``, `rlhf_env.chat.detect_end_of_turn`, else none; the stop tokens are
    ``env.unwrapped.world.stop_token_ids``), ``render_mode`` ("ansi").

    Reward functions and ``task.gold`` receive each prompt as the task gives it (a conversation's messages) and the
    response as text: decoded without its closing stop token and without special tokens, so no template markup.

    Paths load from local folders only (`rlhf_env.models.load_causal_lm`, `rlhf_env.models.load_tokenizer`), and
    parts that do not fit together raise `ValueError` here, when the env is built: a reward model read through
    the policy's ids with fewer embedding rows than the policy's vocabulary, a ``max_new_tokens`` that leaves no
    room for a prompt in the shortest context of the models the env runs (the reward model's when ids pass
    through), weights that do not match their config, a tokenizer without EOS
    (a tokenizer without a pad token pads with EOS inside the env; the object itself is not changed).

    ## Failures
    ``reset`` refuses a ``seed`` that is not an int ≥ 0 or None (`TypeError`/`ValueError`) and ``options`` that are
    not a dict or None (`ValueError`), changing nothing. ``step`` is transactional: it computes and checks the step
    (log-probs, the reward function or model, ``task.gold``, ``agent.action_logprobs``, finiteness) before it
    changes anything, so an error there leaves the env as it was and the step can be retried. A reward function or
    ``task.gold`` must return a real number (`rlhf_env.reward.real_score`; bool, str, None, complex, sequences:
    `TypeError` naming it); a score, token KL or reward not finite in float32 is `NonFiniteReward` (a score is
    masked instead under ``nonfinite_reward="mask"``). An error while the step is committed (the models' forward)
    makes ``step`` and ``next_token_logprobs`` raise `ResetNeeded`, naming it, until ``reset``.

    ## Vectorized environment
    ``gym.make_vec("RLHF-v0", num_envs=N)`` returns the native `RLHFVectorEnv`: one batch and one KV cache per
    model for all N rows, one forward per model per step, ``AutoresetMode.NEXT_STEP``. With ``num_envs=1`` it
    reproduces this env exactly (same seed, same actions).

    ## Version History
    * v0 (unreleased): transactional steps, checked reward values (real numbers, finite in float32), parts
      checked for compatibility when the env is built, tokenizers loaded from local folders only.
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
        self._episodes = self.world.episode_batch(1)
        self._last_info: dict = {}

    @property
    def next_token_logprobs(self) -> np.ndarray:
        """log π(· | state) at the env's temperature, ``(V,)``: what an LM agent samples its action from.
        `ResetNeeded` before the first reset, after the episode ended, or after a step that failed half-way."""
        self._require_acting_policy()
        self._check_not_failed()
        if not self._episodes.active[0]:
            raise ResetNeeded("no active episode: call reset() first")
        return self._episodes.policy_logprobs()[0].cpu().numpy().copy()  # (V,)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode. `seed`: an int ≥ 0 (numpy integers too) or None (`TypeError` / `ValueError` naming it);
        `options`: a dict or None (`ValueError`). A rejected reset changes nothing, the generator included."""
        seed = check_seed(seed)
        # Drawn on a copy (or a fresh generator for a seed), so that bad options leave the generator as it was.
        rng = seeding.np_random(seed)[0] if seed is not None else copy.deepcopy(self.np_random)
        prompt, query = self.world.draw_prompt(options, rng)
        super().reset(seed=seed)
        self._np_random = rng
        try:
            self.world.start_episode(self._episodes, 0, prompt, query)
            self._episodes.feed([query], restart=[True])
        except BaseException as error:  # the models' forward failed half-way: only a reset can help
            self._failed = error
            raise
        self._failed = None
        self._last_info = {}
        return self._observation(), {"prompt": prompt, "prompt_tokens": len(query)}

    def step(self, action):
        """One token. Transactional: an error in a user callback (reward_fn, reward model, task.gold,
        agent.action_logprobs) or a non-finite reward leaves the env exactly as before the call, so the same step
        can be retried. If the commit itself fails (the models' forward raises), the env needs a reset
        (`ResetNeeded` naming the error on the next step)."""
        self._check_not_failed()
        if not self._episodes.active[0]:
            raise ResetNeeded("step() called before reset() or after the episode ended; call reset()")
        token = self.world.check_action(action)
        logprobs, ref_logprobs = self._episodes.token_logprobs([token])
        if self.world.kl_mode == "agent":
            logprobs = self.world.agent_logprobs(self._episodes.observation(slice(0, 1)), [token], [0])
        step, ends = self.world.pay_rows(self._episodes, [0], [token], logprobs[:1], ref_logprobs[:1])  # no change
        info = {key: values[0].item() for key, values in step.items()} | ends.get(0, {})
        reward, terminated = info.pop("reward"), info.pop("terminated")
        try:
            self.world.commit_rows(self._episodes, [0], [token], logprobs[:1], ref_logprobs[:1], ends)
            if not terminated:
                self._episodes.feed([[token]], restart=[False])
        except BaseException as error:
            self._failed = error
            raise
        self._last_info = dict(info, reward=reward)
        return self._observation(), float(reward), terminated, False, info

    def render(self):
        if self.render_mode != "ansi":
            return None
        info = self._last_info
        if self._episodes.prompts[0] is None:
            return "(no episode yet: call reset())\n"
        text = self.tokenizer.decode(self._episodes.responses[0], skip_special_tokens=True)
        parts = [f"prompt:   {self._episodes.prompts[0]}", f"response: {text}"]
        if "kl" in info:
            parts.append(f"last token: logprob {info['logprob']:.3f}, ref_logprob {info['ref_logprob']:.3f}, "
                         f"kl {info['kl']:.3f}, reward {info['reward']:.3f}")
        if "score" in info:
            parts.append(f"end: score {info['score']:.3f}, gold {info['gold_score']:.3f}, "
                         f"kl_sum {info['kl_sum']:.3f}, length {info['length']}")
        return "\n".join(parts) + "\n"

    def close(self):
        """Free the KV caches and end the episode; the env can be reset and used again."""
        self._episodes.release()

    def _observation(self) -> dict:
        return self._episodes.observation(0)
