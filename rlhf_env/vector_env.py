"""The native batched RLHF environment: N episodes, one KV cache per model, one forward per model per step."""

from __future__ import annotations

import copy
import sys

import numpy as np
from gymnasium.error import InvalidAction, ResetNeeded
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from rlhf_env.world import RLHFWorld, WorldParts, check_options, check_seed, checked_integer


class RLHFVectorEnv(WorldParts, VectorEnv):
    """``num_envs`` RLHF-v0 episodes stepped together; what ``gym.make_vec("RLHF-v0", num_envs=N)`` returns.

    ## Description
    The same episodes, rewards and ``info`` keys as `rlhf_env.env.RLHFEnv`, computed for all rows at once: per
    step, one forward of π and one of π_ref over the whole batch (each with its KV cache), and one reward-model
    forward (one per reward model, with several ``rewards``) over the rows whose episodes end. Rows that restart
    feed their new query in the same forward as the others' next tokens, so the step count never multiplies the
    forwards.

    ## Action Space
    ``MultiDiscrete([V] * num_envs)``: one token id per row.

    ## Observation Space
    The single env's ``Dict(input_ids, attention_mask)``, batched: arrays of shape ``(num_envs, P + T)``.

    ## Rewards
    Per row, as in `RLHFEnv`: ``−β·KL_t`` every step, plus the score (and any missing-EOS penalty) on the last.

    ## Starting State
    ``reset(seed=s)`` seeds row i with ``s + i``, the convention of Gymnasium's `SyncVectorEnv`, so that row i
    draws the same prompts as a single env seeded ``s + i``; ``reset()`` without a seed, and every autoreset,
    continue each row's generator (Gymnasium's rule: no seed, no reseeding), so ``reset(seed=s); reset()`` draws
    the same prompts on every run, and ``num_envs=1`` reproduces the single env (a list of seeds seeds each row;
    ``None`` in it continues that row); ``options`` apply to every row, except
    ``{"prompts": [p_0, ..., p_{N-1}]}``, which pins one prompt per row (K samples of a prompt for RLOO).

    ## Episode End
    As in `RLHFEnv` (``terminated`` at EOS or at the token cap; ``truncated`` is always False). Autoreset mode
    ``NEXT_STEP`` (default): the step after a row terminates resets it, ignores its action and returns reward 0.
    ``autoreset_mode="SameStep"``: a row that terminates starts its next episode in the same step (its query joins
    that step's forward); the returned observation and ``info`` are the new episode's, the finished episode's are
    in ``infos["final_obs"]`` (an object array of observations) and ``infos["final_info"]`` (score, gold_score, …),
    each with its row mask, as in Gymnasium's `SyncVectorEnv`. SB3's `VecEnv` convention (`rlhf_env.sb3`).

    ## Arguments
    ``num_envs``, ``autoreset_mode`` and every argument of `RLHFEnv` (with ``kl_mode="agent"`` the attached agent
    is asked for the log-probs of all rows at once; an adaptive β moves once per ``kl_batch_episodes`` finished
    episodes of any rows).

    ## Version History
    * v0 (unreleased): transactional steps (a failed step changes no row, autoreset rows included), as in
      `RLHFEnv`.
    * v0 (rlhf-gym 0.2): an adaptive β moves once per ``kl_batch_episodes`` finished episodes by the error of their
      mean KL (it moved after each episode by that episode's); unseeded resets continue the seeded generators.
    * v0: initial version.

    >>> import gymnasium as gym
    >>> import numpy as np
    >>> import rlhf_env
    >>> envs = gym.make_vec("RLHF-v0", num_envs=4)
    >>> obs, infos = envs.reset(seed=0)
    >>> obs["input_ids"].shape[0], envs.action_space.shape
    (4, (4,))
    >>> logp = envs.unwrapped.next_token_logprobs  # (4, V): what an LM agent samples its actions from
    >>> obs, rewards, terminated, truncated, infos = envs.step(logp.argmax(axis=1))
    >>> rewards.shape, bool(truncated.any())
    ((4,), False)
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": ["ansi"]}

    def __init__(self, num_envs: int = 1, render_mode: str | None = None,
                 autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP, **world_kwargs):
        num_envs = checked_integer("num_envs", num_envs)
        modes = (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP)
        if autoreset_mode not in modes and autoreset_mode not in [m.value for m in modes]:
            raise ValueError(f"autoreset_mode must be one of {[m.value for m in modes]}, got {autoreset_mode!r}")
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        self.metadata = dict(self.metadata, autoreset_mode=self.autoreset_mode)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None")
        self.num_envs, self.render_mode = num_envs, render_mode
        self.world = RLHFWorld(**world_kwargs)
        self.single_action_space = self.world.action_space
        self.single_observation_space = self.world.observation_space
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self._episodes = self.world.episode_batch(num_envs)
        self._rngs = [seeding.np_random()[0] for _ in range(num_envs)]
        self._autoreset = np.zeros(num_envs, dtype=bool)
        self._started = False

    @property
    def next_token_logprobs(self) -> np.ndarray:
        """log π(· | state) of every row at the env's temperature, ``(num_envs, V)`` (a copy)."""
        return self.next_token_distribution().cpu().numpy().copy()

    def next_token_distribution(self):
        """The same log-probs as a torch tensor ``(num_envs, V)`` on the env's device, without a copy (read it before
        the next step; an agent samples from it without a round trip through numpy)."""
        self._require_acting_policy()
        self._check_not_failed()
        if not self._started:
            raise ResetNeeded("call reset() first")
        return self._episodes.policy_logprobs()

    def queries(self) -> list[list[int]]:
        """Each row's current query (prompt token ids), as the models saw it."""
        return [list(query) for query in self._episodes.queries]

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        """Start every row's episode. `seed`: an int ≥ 0 (numpy integers too), a list of ``num_envs`` such ints or
        None, or None (`TypeError` / `ValueError` naming it); `options`: a dict or None (`ValueError`). A rejected
        reset changes nothing, the generators included."""
        if seed is None:
            seeds = [None] * self.num_envs
        elif isinstance(seed, (list, tuple, np.ndarray)):
            seeds = [check_seed(s) for s in seed]
            if len(seeds) != self.num_envs:
                raise ValueError(f"seed: expected {self.num_envs} seeds, got {len(seeds)}")
        else:
            seeds = [check_seed(seed) + i for i in range(self.num_envs)]
        check_options(options)
        # Gymnasium's rule, row by row: a seed starts a new generator, no seed continues the row's own (seeded
        # earlier, or from OS entropy when the env was made), as each sub-env of a SyncVectorEnv does. Drawn on
        # copies, so that a rejected reset leaves every generator as it was.
        rngs = [copy.deepcopy(rng) if s is None else seeding.np_random(s)[0] for s, rng in zip(seeds, self._rngs)]
        row_options = self._row_options(options)
        drawn = [self.world.draw_prompt(o, rng) for o, rng in zip(row_options, rngs)]  # checked before any change
        self._rngs = rngs
        try:
            for row, (prompt, query) in enumerate(drawn):
                self.world.start_episode(self._episodes, row, prompt, query)
            self._episodes.feed([query for _, query in drawn], restart=[True] * self.num_envs)
        except BaseException as error:  # the models' forward failed half-way: only a reset can help
            self._failed = error
            raise
        self._failed = None
        self._autoreset[:] = False
        self._started, self.closed = True, False  # a closed env is usable again after a reset
        infos = {"prompt": _objects([p for p, _ in drawn]),
                 "prompt_tokens": np.array([len(q) for _, q in drawn])}
        return self._observations(), infos

    def _row_options(self, options: dict | None) -> list[dict | None]:
        """Reset options per row: ``"prompts"`` (one prompt per row) becomes each row's ``"prompt"``."""
        if not options or "prompts" not in options:
            return [options] * self.num_envs
        prompts = options["prompts"]
        if isinstance(prompts, str) or not hasattr(prompts, "__len__") or len(prompts) != self.num_envs:
            raise ValueError(f"reset option 'prompts' must be a list of {self.num_envs} prompts, one per row")
        if "prompt" in options:
            raise ValueError("pass reset option 'prompt' (all rows) or 'prompts' (one per row), not both")
        rest = {k: v for k, v in options.items() if k != "prompts"}
        return [dict(rest, prompt=prompt) for prompt in prompts]

    def step(self, actions):
        """One token per row. Transactional, as `RLHFEnv.step`: the step is computed and checked first (user
        callbacks, scores), and only then committed (tokens appended, autoreset rows started, KLs recorded, the
        models fed); a failure before the commit leaves the env exactly as it was, one during it (the models'
        forward) makes the next step raise `ResetNeeded`."""
        self._check_not_failed()
        if not self._started:
            raise ResetNeeded("step() called before reset(); call reset()")
        tokens = self._check_actions(actions)
        n = self.num_envs
        rewards, terminated = np.zeros(n), np.zeros(n, dtype=bool)
        stepping = [row for row in range(n) if not self._autoreset[row]]
        logprobs, ref_logprobs = self._episodes.token_logprobs(tokens)
        if self.world.kl_mode == "agent":
            logprobs = self.world.agent_logprobs(self._observations(), tokens, stepping)
        stepped = ([tokens[r] for r in stepping], [logprobs[r] for r in stepping], [ref_logprobs[r] for r in stepping])
        step, ends = self.world.pay_rows(self._episodes, stepping, *stepped)  # computed and checked; nothing changed
        try:
            return self._commit(tokens, stepping, stepped, step, ends, rewards, terminated)
        except BaseException as error:  # the models' forward failed half-way: only a reset can help
            self._failed = error
            raise

    def _commit(self, tokens, stepping, stepped, step, ends, rewards, terminated):
        """The step's changes, in order: append and record KLs, start the autoreset rows, feed the models."""
        n = self.num_envs
        self.world.commit_rows(self._episodes, stepping, *stepped, ends)
        row_infos: dict[int, dict] = {}  # per row: a new episode's prompt, a finished one's end-of-episode info
        inputs: list[list[int] | None] = [None] * n
        restart = [False] * n
        for row in range(n):
            if self._autoreset[row]:  # NEXT_STEP autoreset: this step starts the row's next episode
                prompt, query = self.world.draw_prompt(None, self._rngs[row])
                self.world.start_episode(self._episodes, row, prompt, query)
                row_infos[row] = {"prompt": prompt}
                inputs[row], restart[row] = query, True
        terminated[stepping], rewards[stepping] = step.pop("terminated"), step.pop("reward")  # arrays over stepping
        index = {row: i for i, row in enumerate(stepping)}  # row -> its entry in the step's arrays
        ended = [row for row in stepping if terminated[row]]
        for row in stepping:
            if not terminated[row]:
                inputs[row] = [tokens[row]]
        row_infos.update(ends)
        final = {}
        if self.autoreset_mode == AutoresetMode.SAME_STEP:  # ended rows start their next episode in this forward
            for row in ended:
                final[row] = (self._episodes.observation(row),
                              {**{key: values[index[row]].item() for key, values in step.items()}, **row_infos[row]})
                prompt, query = self.world.draw_prompt(None, self._rngs[row])
                self.world.start_episode(self._episodes, row, prompt, query)
                row_infos[row] = {"prompt": prompt, "prompt_tokens": len(query)}
                inputs[row], restart[row] = query, True
        else:
            self._autoreset = terminated.copy()
        self._episodes.feed(inputs, restart)
        infos = _stack(row_infos, n)
        shown = [i for i, row in enumerate(stepping) if row not in final]  # restarted rows show their new episode
        if shown:
            rows = [stepping[i] for i in shown]
            mask = np.zeros(n, dtype=bool)
            mask[rows] = True
            for key, values in step.items():
                infos[key] = np.zeros(n, dtype=values.dtype)
                infos[key][rows] = values[shown]
                infos[f"_{key}"] = mask.copy()
        if final:
            mask = np.isin(np.arange(n), list(final))
            final_obs = np.full(n, None, dtype=object)
            for row, (obs, _) in final.items():
                final_obs[row] = obs
            infos.update(final_obs=final_obs, _final_obs=mask, _final_info=mask,
                         final_info=_stack({row: info for row, (_, info) in final.items()}, n))
        return self._observations(), rewards, terminated, np.zeros(self.num_envs, dtype=bool), infos

    def render(self):
        if self.render_mode != "ansi":
            return None
        if not self._started:
            return "(no episodes yet: call reset())\n"
        decode = self.tokenizer.decode
        return "".join(f"[{row}] {self._episodes.prompts[row]} | "
                       f"{decode(self._episodes.responses[row], skip_special_tokens=True)}\n"
                       for row in range(self.num_envs))

    def _check_actions(self, actions) -> list[int]:
        """One integer token id per row, or `InvalidAction` (nothing has changed yet)."""
        if isinstance(actions, (str, bytes)) or actions is None:
            raise InvalidAction(f"actions must be an array of {self.num_envs} token ids, got {actions!r}")
        array = np.asarray(actions)
        if array.shape != (self.num_envs,):
            raise InvalidAction(f"actions must have shape ({self.num_envs},), got {array.shape}")
        if not np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
            raise InvalidAction(f"actions must be integer token ids, got dtype {array.dtype}")
        if array.min() < 0 or array.max() >= self.world.vocab_size:
            raise InvalidAction(f"actions must be token ids in [0, {self.world.vocab_size}), got {array.tolist()}")
        return [int(a) for a in array]

    def close_extras(self, **kwargs):
        """Free the KV caches and end every episode (`close` then marks the env closed).

        Gymnasium < 1.3 also calls `close` from ``__del__``: then it may run on an env whose constructor raised, or
        at interpreter exit, where touching tensors aborts the process; there is nothing to free in either case.
        """
        if "_episodes" not in vars(self) or sys.is_finalizing():
            return
        self._episodes.release()
        self._started = False

    def _observations(self) -> dict:
        return self._episodes.observation()


def _stack(row_infos: dict[int, dict], num_envs: int) -> dict:
    """Per-row info dicts → Gymnasium's vector form: ``infos[key]`` an array, ``infos["_" + key]`` its row mask."""
    infos = [row_infos.get(row, {}) for row in range(num_envs)]
    keys = sorted({key for info in infos for key in info})
    out = {}
    for key in keys:
        present = [key in info for info in infos]
        values = [info.get(key) for info in infos]
        sample = next(v for v in values if v is not None)
        if isinstance(sample, bool):
            array = np.array([bool(v) for v in values])
        elif isinstance(sample, (int, float)):
            array = np.array([0 if v is None else v for v in values],
                             dtype=np.float64 if isinstance(sample, float) else np.int64)
        else:
            array = _objects(values)
        out[key], out[f"_{key}"] = array, np.array(present)
    return out


def _objects(values: list) -> np.ndarray:
    """A 1-d object array holding `values` as they are (``np.array`` would make equal-length lists, such as
    conversation prompts, into a 2-d array of their items)."""
    array = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        array[i] = value
    return array
