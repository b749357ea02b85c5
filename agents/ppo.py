"""PPO with a value head for language-model policies on RLHF-v0 (the InstructGPT recipe).

    python -m agents.ppo --task sentiment --reward gold --total-timesteps 200000 --out runs/ppo-gt
    python -m agents.ppo --diagnose runs/ppo-gt/metrics.jsonl

One update (`PPO.update`) reads as numbered phases: 1. rollout from the vector env (the env computes log π,
log π_ref, the per-token KL penalty and the score); 2. old log-probs and values in the training layout; 3. GAE
advantages; 4. K epochs × minibatches of the clipped policy and value losses; 5. stats. Every implementation
detail that matters is a field of `PPOConfig` with its default and its source.

Legend: ``B`` episodes per update, ``P`` query tokens, ``T`` response tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from agents.checkpoint import load_training_state, save_training_state
from agents.core import (
    entropy_from_logits,
    explained_variance,
    gae,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from agents.metrics import MetricsLogger, diagnose, read_history
from agents.policy import ActorCritic
from agents.rollout import Episodes, collect_episodes, episode_stats, sample_tokens, unwrap_vector_env
from rlhf_env.build.common import encode_pairs
from rlhf_env.build.sft import sft_loss
from rlhf_env.lm import pad_left, pad_right
from rlhf_env.models import load_causal_lm

CRITIC_FILE = "critic.safetensors"


def exact_div(a: int, b: int, what: str) -> int:
    if b <= 0 or a % b:
        raise ValueError(f"{what}: {a} is not a multiple of {b}")
    return a // b


@dataclass(frozen=True)
class PPOConfig:
    episodes_per_update: int = 64
    """Episodes per update (a multiple of the vector env's num_envs; each rollout runs every row once)."""
    minibatch_size: int = 16
    """Episodes per optimizer step."""
    update_epochs: int = 4
    """Passes over each batch (K)."""
    learning_rate: float = 1e-4
    """Adam step size (constant). Tiny GPT-2 policies take larger steps than the 1e-5 of billion-parameter runs
    (3e-4 learned faster for 50 updates, then plateaued lower: see docs/design.md)."""
    adam_eps: float = 1e-5
    """Adam epsilon (CleanRL's PPO default)."""
    gamma: float = 1.0
    """Discount over response tokens (1: the score counts fully at every token, as in InstructGPT)."""
    lam: float = 0.95
    """GAE λ."""
    clip_range: float = 0.2
    """PPO ratio clip ε."""
    clip_range_value: float | None = 0.2
    """Value clip around the old values (None: plain MSE)."""
    vf_coef: float = 0.1
    """Value loss coefficient c₁ (TRL's PPO default: the value loss must not drown the policy's gradient)."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient (the KL penalty already keeps the policy near π_ref)."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    target_kl: float | None = None
    """Stop the epochs of an update early once the mean approx-KL to the rollout policy exceeds this."""
    whiten_advantages: bool = True
    """Normalise advantages over the batch's tokens (the 37 PPO details, #7)."""
    whiten_rewards: bool = False
    """Scale the per-token rewards to unit variance before GAE (sign kept; TRL's whiten_rewards)."""
    score_clip: float | None = None
    """Clip the end-of-episode score to ±score_clip before GAE (the KL part is never clipped)."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight of the SFT log-likelihood on the task's demonstrations (InstructGPT's alignment-tax fix)."""
    ptx_batch_size: int = 16
    """Demonstrations per minibatch for the ptx term."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per minibatch (gradients are summed, then one step)."""
    separate_critic: bool = False
    """Give the critic its own trunk instead of a head on the policy's."""
    value_init: str = "zero"
    """Value head init: "zero", "small", or "reward_model" (needs separate_critic)."""
    seed: int = 0
    """Seeds the value head, the rollouts' prompts and samples, the minibatch order and the ptx demonstrations."""

    @property
    def num_minibatches(self) -> int:
        return exact_div(self.episodes_per_update, self.minibatch_size, "episodes_per_update / minibatch_size")

    @property
    def micro_batch_size(self) -> int:
        return exact_div(self.minibatch_size, self.gradient_accumulation_steps,
                         "minibatch_size / gradient_accumulation_steps")


class PPO:
    """PPO on the env's acting policy: ``PPO(gym.make_vec("RLHF-v0", num_envs=16), PPOConfig()).learn(100_000)``.

    The policy being trained is ``env.unwrapped.policy`` (in place), so the env's per-token KL is always that of
    the policy that acted. β (fixed or adaptive) lives in the env; the checkpoint saves its controller.
    """

    def __init__(self, env, config: PPOConfig = PPOConfig(), out_dir: str | Path | None = None,
                 progress: bool = True):
        self.envs = unwrap_vector_env(env)
        world = self.envs.world
        if world.policy is None:
            raise ValueError("PPO trains the env's acting policy: make the env with kl_mode='policy' (the default)")
        exact_div(config.episodes_per_update, self.envs.num_envs, "episodes_per_update / num_envs")
        _ = config.num_minibatches, config.micro_batch_size  # raise now if the sizes do not divide
        self.config, self.world, self.device = config, world, world.device
        torch.manual_seed(config.seed)  # the value head's init
        self.model = ActorCritic(world.policy, config.value_init, config.separate_critic, world.reward_model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=config.learning_rate, eps=config.adam_eps)
        self.rng = np.random.default_rng(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.num_timesteps = self.num_updates = self.num_episodes = 0
        self.out_dir, self.progress = out_dir, progress
        self.logger = MetricsLogger(out_dir)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else None

    # ---------------------------------------------------------------- training
    def learn(self, total_timesteps: int, callback=None) -> PPO:
        """Update until `total_timesteps` env steps (generated tokens, idle rows included) have been taken.

        ``callback(agent, metrics)`` runs after every update; returning False stops training.
        """
        bar = tqdm(total=total_timesteps, initial=min(self.num_timesteps, total_timesteps), unit="tok",
                   disable=not self.progress)
        while self.num_timesteps < total_timesteps:
            metrics = self.update()
            bar.update(min(metrics["time/timesteps"], total_timesteps) - bar.n)
            bar.set_postfix({k.split("/")[1]: round(metrics[k], 3) for k in
                             ("objective/score", "objective/gold_score", "objective/kl")})
            if callback is not None and callback(self, metrics) is False:
                break
        bar.close()
        return self

    def update(self) -> dict:
        """One PPO iteration: rollout, advantages, K epochs of minibatch updates. Returns the logged metrics."""
        cfg, start = self.config, time.perf_counter()
        # 1. rollout: the env samples-and-scores; we keep its log-probs, rewards and scores (never recomputed).
        self.model.eval()
        episodes = self._rollout()
        rollout_seconds = time.perf_counter() - start
        stats = episode_stats(episodes, self.world.beta, self.world.task)
        b = self._batch_tensors(episodes)
        mask = b["response_mask"].float()  # (B, T)
        # 2. old log-probs and values, in the training forward's layout: the first minibatch of epoch 0 repeats
        #    this computation exactly, so its ratio is exactly 1 (the env's incremental KV-cache log-probs agree
        #    with these only to ~1e-6, so they are used for the reward, not for the ratio).
        orders = [self.rng.permutation(len(episodes)) for _ in range(cfg.update_epochs)]
        old_logprobs, old_values = torch.zeros_like(mask), torch.zeros_like(mask)
        with torch.no_grad():
            for micro in self._micro_batches(orders[0]):
                logits, values = self._forward(b, micro)
                old_logprobs[micro] = logprobs_from_logits(logits, b["responses"][micro])
                old_values[micro] = values
        rollout_mismatch = float(((old_logprobs - b["env_logprobs"]).abs() * mask).max())
        # 3. advantages: GAE over response tokens; the episode's last token is terminal (value 0 after it).
        rewards = b["rewards"]
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)  # (B, T) each
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        # 4. K epochs × minibatches: clipped policy loss + c₁·clipped value loss − c₂·entropy (+ ptx).
        self.model.train()
        log = {key: [] for key in ("loss/policy", "loss/value", "loss/ptx", "policy/entropy", "policy/clipfrac",
                                   "policy/approx_kl", "policy/ratio", "val/clipfrac", "train/grad_norm")}
        skipped, epochs_run = 0, 0
        for order in orders:
            epoch_kl = []
            for minibatch in np.split(order, cfg.num_minibatches):
                self.optimizer.zero_grad(set_to_none=True)
                finite = True
                for micro in np.split(minibatch, cfg.gradient_accumulation_steps):
                    m = mask[micro]
                    logits, values = self._forward(b, micro)
                    logprobs = logprobs_from_logits(logits, b["responses"][micro])  # (b, T)
                    entropy = masked_mean(entropy_from_logits(logits), m)
                    pg_loss, pg_stats = policy_loss(logprobs, old_logprobs[micro], advantages[micro], m,
                                                    cfg.clip_range)
                    vf_loss, vf_stats = value_loss(values, old_values[micro], returns[micro], m,
                                                   cfg.clip_range_value)
                    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy
                    ptx_loss = self._ptx_loss() if cfg.ptx_coef > 0 else torch.zeros((), device=self.device)
                    loss = loss + cfg.ptx_coef * ptx_loss
                    if not torch.isfinite(loss):
                        finite = False
                        break
                    (loss / cfg.gradient_accumulation_steps).backward()
                    for key, value in (("loss/policy", pg_loss.item()), ("loss/value", vf_loss.item()),
                                       ("loss/ptx", ptx_loss.item()), ("policy/entropy", entropy.item()),
                                       ("policy/clipfrac", pg_stats["clipfrac"]),
                                       ("policy/approx_kl", pg_stats["approx_kl"]), ("policy/ratio", pg_stats["ratio"]),
                                       ("val/clipfrac", vf_stats["clipfrac"])):
                        log[key].append(value)
                    epoch_kl.append(pg_stats["approx_kl"])
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm) if finite else None
                if not finite or not torch.isfinite(grad_norm):  # skip this step: parameters stay as they are
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
                log["train/grad_norm"].append(grad_norm.item())
                self.optimizer.step()
            epochs_run += 1
            if cfg.target_kl is not None and epoch_kl and np.mean(epoch_kl) > cfg.target_kl:
                break
        # 5. stats
        self.num_updates += 1
        self.num_episodes += len(episodes)
        self.num_timesteps += episodes.tokens
        seconds = time.perf_counter() - start
        metrics = {"time/updates": self.num_updates, "time/timesteps": self.num_timesteps,
                   "time/episodes": self.num_episodes, **stats,
                   **{key: float(np.mean(values)) if values else float("nan") for key, values in log.items()},
                   "val/explained_variance": explained_variance(old_values, returns, mask),
                   "val/mean": float(masked_mean(old_values, mask)),
                   "train/epochs": epochs_run, "train/skipped_minibatches": skipped,
                   "train/rollout_logprob_mismatch": rollout_mismatch,
                   "time/tokens_per_s": episodes.tokens / rollout_seconds, "time/update_seconds": seconds}
        self.logger.log(metrics)
        return metrics

    def _rollout(self) -> Episodes:
        episodes = Episodes()
        for _ in range(self.config.episodes_per_update // self.envs.num_envs):
            episodes.extend(collect_episodes(self.envs, int(self.rng.integers(2**31 - 1)), self.generator))
        return episodes

    def _batch_tensors(self, episodes: Episodes) -> dict[str, torch.Tensor]:
        pad, device = self.world.pad_token_id, self.device
        query_ids, query_mask = pad_left(episodes.queries, pad, device)  # (B, P)
        responses, response_mask = pad_right(episodes.responses, pad, device=device)  # (B, T)
        width = responses.shape[1]

        def floats(rows):  # ragged per-token floats → (B, T), 0 on padding
            out = torch.zeros((len(rows), width), device=device)
            for i, row in enumerate(rows):
                out[i, : len(row)] = torch.tensor(row, device=device)
            return out

        rewards = floats(episodes.rewards)
        if self.config.score_clip is not None:  # clip only the score part of each episode's last reward
            last = response_mask.sum(1) - 1
            scores = torch.tensor(episodes.scores, device=device)
            clipped = scores.clamp(-self.config.score_clip, self.config.score_clip)
            rewards[torch.arange(len(scores), device=device), last] += clipped - scores
        return {"query_ids": query_ids, "query_mask": query_mask, "responses": responses,
                "response_mask": response_mask, "rewards": rewards, "env_logprobs": floats(episodes.logprobs)}

    def _micro_batches(self, order: np.ndarray) -> list[np.ndarray]:
        return np.split(order, len(order) // self.config.micro_batch_size)

    def _forward(self, b: dict, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(b, T, V)`` at the sampling temperature and values ``(b, T)`` for episodes `rows`."""
        rows = torch.as_tensor(rows, device=self.device)
        args = (b["query_ids"][rows], b["query_mask"][rows], b["responses"][rows], b["response_mask"][rows])
        if self.autocast is None:
            return self.model(*args, temperature=self.world.temperature)
        with self.autocast:
            return self.model(*args, temperature=self.world.temperature)

    def _ptx_loss(self) -> torch.Tensor:
        """PPO-ptx: the SFT negative log-likelihood of a batch of the task's demonstrations."""
        task, tokenizer = self.world.task, self.world.tokenizer
        demos = task.demonstrations(self.config.ptx_batch_size, self.rng)
        pairs = encode_pairs(tokenizer, [p for p, _ in demos], [r for _, r in demos],
                             int(self.model.lm.config.max_position_embeddings)).to(self.device)
        return sft_loss(self.model.lm, pairs.rows(slice(None)))

    # ---------------------------------------------------------------- acting
    @torch.no_grad()
    def predict(self, observation: dict, deterministic: bool = False) -> tuple[np.ndarray, None]:
        """The next token for an env observation (one, or a batch), SB3-style: ``(action, None)``."""
        ids = torch.as_tensor(np.asarray(observation["input_ids"]), device=self.device)
        attention = torch.as_tensor(np.asarray(observation["attention_mask"]), device=self.device)
        single = ids.ndim == 1
        ids, attention = (ids[None], attention[None]) if single else (ids, attention)
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        logits = self.model.lm(input_ids=ids, attention_mask=attention, position_ids=positions).logits
        last = (attention * torch.arange(ids.shape[1], device=self.device)).argmax(1)  # last real token
        logp = torch.log_softmax(logits[torch.arange(ids.shape[0]), last].float() / self.world.temperature, -1)
        if deterministic:
            actions = logp.argmax(-1)
        else:
            actions = sample_tokens(logp.cpu(), self.generator)
        actions = actions.cpu().numpy()
        return (actions[0] if single else actions), None

    # ---------------------------------------------------------------- checkpoints
    def save(self, directory: str | Path) -> None:
        """Policy (safetensors), critic, optimizer, RNG states, KL controller, counters and config."""
        from safetensors.torch import save_file

        directory = Path(directory)
        self.model.lm.save_pretrained(directory / "policy")
        save_file({k: v.contiguous() for k, v in self.model.critic_state_dict().items()}, directory / CRITIC_FILE)
        save_training_state(directory, self.optimizer, self.rng, self.generator, {
            "algorithm": "ppo", "config": asdict(self.config), "num_timesteps": self.num_timesteps,
            "num_updates": self.num_updates, "num_episodes": self.num_episodes,
            "kl_controller": self.world.kl_controller.state_dict()})

    @classmethod
    def load(cls, directory: str | Path, env, out_dir: str | Path | None = None, progress: bool = True) -> PPO:
        """Resume from `save`: `env` must be built like the original (same task, reference and reward)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta = json.loads((directory / "training_state.json").read_text())
        if meta.get("algorithm") != "ppo":
            raise ValueError(f"{directory} is not a PPO checkpoint")
        agent = cls(env, PPOConfig(**meta["config"]), out_dir=out_dir, progress=progress)
        with torch.no_grad():
            saved = load_causal_lm(directory / "policy", device=agent.device)
            agent.model.lm.load_state_dict(saved.state_dict())
            missing, unexpected = agent.model.load_state_dict(load_file(directory / CRITIC_FILE), strict=False)
        if unexpected or any(not k.startswith("lm.") for k in missing):
            raise ValueError(f"critic weights do not match: missing {missing}, unexpected {unexpected}")
        meta = load_training_state(directory, agent.optimizer, agent.rng, agent.generator)
        agent.world.kl_controller.load_state_dict(meta["kl_controller"])
        agent.num_timesteps, agent.num_updates = meta["num_timesteps"], meta["num_updates"]
        agent.num_episodes = meta["num_episodes"]
        return agent


def main(argv: list[str] | None = None) -> dict | list[str]:
    import gymnasium as gym

    import rlhf_env
    from agents.evaluate import evaluate, kl_regularised_optimum

    parser = argparse.ArgumentParser(description="PPO with a value head on RLHF-v0")
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--reward", choices=["rm", "gold"], default="rm", help="learned reward model or gold (PPO-GT)")
    parser.add_argument("--total-timesteps", type=int, default=200_000)
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--kl-target", type=float, default=None, help="adaptive β toward this episode KL")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="directory for metrics.jsonl, the final model and summary")
    parser.add_argument("--eval-episodes", type=int, default=512)
    parser.add_argument("--estimate-optimum", action="store_true",
                        help="also estimate the KL-regularised optimum of the gold reward (sampling from π_ref)")
    parser.add_argument("--diagnose", metavar="METRICS_JSONL", help="only diagnose an existing run and exit")
    parser.add_argument("--no-progress", action="store_true")
    for f in fields(PPOConfig):
        if f.name not in ("seed",) and f.type in ("int", "float", "bool", "float | None"):
            kind = {"int": int, "float": float, "float | None": float}.get(f.type)
            if f.type == "bool":
                parser.add_argument(f"--{f.name.replace('_', '-')}", type=lambda s: s.lower() in ("1", "true"),
                                    default=f.default)
            else:
                parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    parser.add_argument("--value-init", default="zero")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.diagnose:
        flags = diagnose(read_history(args.diagnose))
        print("\n".join(flags) if flags else "no failure mode detected")
        return flags
    if args.threads:
        torch.set_num_threads(args.threads)
    config = PPOConfig(**{f.name: getattr(args, f.name) for f in fields(PPOConfig)})
    task = rlhf_env.tasks.get_task(args.task)
    kwargs = dict(beta=args.beta, kl_target=args.kl_target, device=args.device)
    if args.reward == "gold":
        kwargs["reward_fn"] = task.gold
    envs = gym.make_vec(rlhf_env.env_id(args.task), num_envs=args.num_envs, **kwargs)
    agent = PPO(envs, config, out_dir=args.out, progress=not args.no_progress)
    optimum = kl_regularised_optimum(envs, task.gold, args.beta) if args.estimate_optimum else None
    before = evaluate(envs, args.eval_episodes, seed=10_000)
    start = time.perf_counter()
    agent.learn(args.total_timesteps)
    seconds = time.perf_counter() - start
    after = evaluate(envs, args.eval_episodes, seed=10_000)
    summary = {"task": args.task, "reward": args.reward, "beta": args.beta, "seed": args.seed,
               "timesteps": agent.num_timesteps, "updates": agent.num_updates, "train_seconds": round(seconds, 1),
               "eval_before": before, "eval_after": after,
               # Share of the gap between π_SFT's held-out gold and the best reachable gold that training closed.
               "gold_gap_closed": (after["objective/gold_score"] - before["objective/gold_score"])
               / (task.best_gold - before["objective/gold_score"]),
               "gold_objective": after["objective/gold_score"] - args.beta * after["objective/kl"],
               "kl_regularised_optimum": optimum, "diagnose": diagnose(agent.logger.history),
               "config": asdict(config)}
    if args.out:
        agent.save(Path(args.out) / "model")
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
