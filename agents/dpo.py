"""Direct preference optimisation (DPO) on the task's preference pairs: the offline comparison for the RL agents.

    python -m agents.dpo --beta 0.5 --total-timesteps 256000 --out runs/dpo-b0.5   # timesteps = pairs seen

DPO (Rafailov et al. 2023) trains the policy directly on pairs (x, y_w, y_l) with a classification loss whose
optimum is the optimum of the RL agents' objective E[r] − β·KL(π ‖ π_ref): no reward model, no sampling. The loss
and its variants (``DPOConfig.loss_type``, ``label_smoothing``) are `agents.core.dpo_loss`; sequence
log-probabilities are summed over response tokens (EOS included, padding never), in fp32 even under bf16.

Evaluated exactly like the RL agents: the env samples from the trained policy on held-out prompts and reports gold
score, RM score, KL to π_ref (measured by sampling, per token, by the env), win rate vs π_SFT and length; plus the
held-out preference accuracy of the implicit reward β·(log π − log π_ref).

Choices: β is the env's β (``gym.make_vec("RLHF-v0", beta=…)``, ``--beta``), so DPO and the RL agents optimise the
same objective; reference log-probs are computed once, before training; the policy stays in eval mode (dropout
off, as TRL's ``disable_dropout`` default); one Adam step per batch of ``batch_size`` pairs, drawn without
replacement epoch after epoch.

Legend: ``N`` pairs, ``P`` query tokens (left-padded), ``T`` response tokens (right-padded).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from agents.checkpoint import load_agent, save_checkpoint
from agents.common import (
    acting_world,
    at_least_one,
    autocast,
    check_field,
    clipped_step,
    exact_div,
    learn_loop,
    non_negative,
    none_or,
    positive,
    predict,
    run_command,
    seeded_generators,
    train_module,
)
from agents.core import DPO_LOSSES, DPOLoss, dpo_loss, logprobs_from_logits
from agents.distributed import Ranks, rank_share
from agents.fsdp import check_shardable
from agents.metrics import MetricsLogger
from agents.policy import response_logits
from rlhf_env.assets import asset_dir, load_preference_pairs
from rlhf_env.pipeline.preferences import load_pairs
from rlhf_env.text import PairedText, encode_pairs, model_max_length


@dataclass(frozen=True)
class DPOConfig:
    loss_type: DPOLoss = "sigmoid"
    """"sigmoid" (DPO) or "ipo" (see `agents.core.dpo_loss`)."""
    label_smoothing: float = 0.0
    """Probability ε that a label is flipped (conservative DPO); 0 is plain DPO."""
    batch_size: int = 64
    """Preference pairs per Adam step."""
    learning_rate: float = 3e-5
    """Adam step size (constant). On the default task 1e-4 and above drove KL past 5 nats with grammar breaking
    (β = 0.1) within 1000 steps; 3e-5 at β = 0.5 rose steadily (README)."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    micro_batch_size: int | None = None
    """Pairs per forward/backward; the micro-batches' gradients add up to one step (None: the whole batch)."""
    pairs: str | None = None
    """Training pairs: a JSONL file with prompt / chosen / rejected per line (None: the task's shipped pairs)."""
    eval_pairs: str | None = None
    """Held-out pairs for the preference accuracy (None: the task's shipped held-out pairs, if any)."""
    seed: int = 0
    """Seeds the order of the pairs."""

    def __post_init__(self):
        if self.loss_type not in DPO_LOSSES:
            raise ValueError(f"loss_type must be one of {DPO_LOSSES}, got {self.loss_type!r}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        check_field(self, "batch_size", at_least_one, "an integer ≥ 1")
        check_field(self, "micro_batch_size", none_or(at_least_one), "None or an integer ≥ 1")
        check_field(self, "learning_rate", non_negative, "a finite number ≥ 0")
        for name in ("adam_eps", "max_grad_norm"):
            check_field(self, name, positive, "a finite number > 0")
        if self.micro_batch_size is not None:
            exact_div(self.batch_size, self.micro_batch_size, "batch_size / micro_batch_size")


class Preferences:
    """Pairs encoded for one forward over chosen and rejected together: rows ``0 … N−1`` are the chosen responses,
    rows ``N … 2N−1`` the rejected ones, with the reference's sequence log-probs of every row."""

    def __init__(self, pairs: list[dict], tokenizer, reference: torch.nn.Module, backend: str, device: torch.device,
                 batch_size: int = 256):
        prompts = [p["prompt"] for p in pairs]
        responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
        self.text: PairedText = encode_pairs(tokenizer, prompts + prompts, responses,
                                             model_max_length(reference)).to(device)
        self.n = len(pairs)
        with torch.no_grad():
            self.ref_logps = torch.cat([sequence_logprobs(reference, backend, self.text, rows)
                                        for rows in np.array_split(np.arange(2 * self.n),
                                                                   max(1, 2 * self.n // batch_size))])  # (2N,)

    def __len__(self) -> int:
        return self.n


def sequence_logprobs(model: torch.nn.Module, backend: str, text: PairedText, rows: np.ndarray) -> torch.Tensor:
    """log π(y|x) of `rows` of `text`, summed over response tokens (padding contributes 0): ``(len(rows),)`` fp32,
    through the agents' training forward (`agents.policy.response_logits`) with `backend`."""
    query_ids, query_mask, responses, response_mask = text.rows(torch.as_tensor(rows, device=text.query_ids.device))
    logits, _ = response_logits(model, query_ids, query_mask, responses, response_mask, backend)  # (n, T, V)
    return (logprobs_from_logits(logits, responses) * response_mask).sum(1)


class DPO:
    """DPO on the env's acting policy (trained in place; the env's reference is π_ref):
    ``DPO(gym.make_vec("RLHF-v0", num_envs=64, beta=0.1), DPOConfig()).learn(60_000)`` (60k pairs).

    Data-parallel when a `torch.distributed` process group is initialised (`agents.distributed`): every rank draws
    the same batch of ``batch_size`` pairs (the order of the pairs comes from the stream the ranks share), trains
    on its ``batch_size / W`` of them, and the update is the single-process update of the whole batch. Each rank
    computes the reference log-probs of all the pairs once, at the start. With ``fsdp=True`` the policy is also
    sharded over the ranks (`agents.fsdp`)."""

    def __init__(self, env, config: DPOConfig = DPOConfig(), out_dir: str | Path | None = None,
                 progress: bool = True, fsdp: bool = False):
        self.config = config
        self.ranks = Ranks.current()
        share = rank_share(config.batch_size, self.ranks, "DPOConfig.batch_size")
        if config.micro_batch_size is not None and not self.ranks.single:
            exact_div(share, config.micro_batch_size, f"each rank's share of the batch (batch_size / "
                                                      f"{self.ranks.world_size} ranks) / micro_batch_size")
        self.envs, self.world = acting_world(env, "DPO", None, self.ranks)
        if fsdp:
            check_shardable(self.world)
        self.device, self.lm = self.world.device, self.world.policy
        self.beta = float(self.world.beta)
        if not self.beta > 0:
            raise ValueError(f"DPO needs the env's beta > 0 (its loss is a function of β·log-ratio), got {self.beta}")
        # The training forward: the env's choice for its policy, or under FSDP the model's own forward (its hooks
        # gather and reduce the shards; the lean GPT-2 path would bypass them).
        self.backend = "hf" if fsdp else self.world.backends["policy"]
        tokenizer, reference = self.world.tokenizer, self.world.reference
        reference_backend = self.world.backends["reference"]
        self.train_pairs = Preferences(self._pairs(config.pairs, "train"), tokenizer, reference, reference_backend,
                                       self.device)
        eval_pairs = self._pairs(config.eval_pairs, "eval", required=False)
        self.eval_pairs = (None if eval_pairs is None
                           else Preferences(eval_pairs, tokenizer, reference, reference_backend, self.device))
        self.rng, self.shared_rng, self.generator = seeded_generators(config.seed, self.ranks)
        self.num_timesteps = self.num_updates = self.num_episodes = 0
        self.params, self.sharded, self.optimizer = train_module(self, self.lm, fsdp)
        self.ranks.check_same("training pairs", len(self.train_pairs))
        self.progress, self.logger = progress, MetricsLogger(out_dir if self.ranks.is_main else None)
        self.order = self.shared_rng.permutation(len(self.train_pairs))  # this epoch's order of the pairs
        self.position, self.epoch = 0, 0

    def _pairs(self, path: str | None, split: str, required: bool = True) -> list[dict] | None:
        if path is not None:
            return load_pairs(path)  # each line checked: a ValueError names the line and the field
        assets = asset_dir(self.world.task)
        if (assets / "manifest.json").is_file():
            return load_preference_pairs(assets, split)
        if required:
            raise ValueError(f"task {self.world.task.name!r} ships no preference pairs: pass DPOConfig(pairs=PATH)")
        return None

    def learn(self, total_timesteps: int, callback=None) -> DPO:
        """Update until `total_timesteps` preference pairs have been trained on (epochs repeat the pairs in a new
        order). ``callback(agent, metrics)`` runs after every update; returning False stops training."""
        return learn_loop(self, total_timesteps, callback, self.progress, unit="pair",
                          shown=("loss/dpo", "rewards/accuracies", "rewards/margins"))

    def _next_batch(self) -> np.ndarray:
        """The next `batch_size` pair indices; a new epoch draws a new order."""
        picked = []
        while len(picked) < self.config.batch_size:
            if self.position == len(self.order):
                self.order, self.position = self.shared_rng.permutation(len(self.train_pairs)), 0
                self.epoch += 1
            take = min(self.config.batch_size - len(picked), len(self.order) - self.position)
            picked.extend(self.order[self.position: self.position + take].tolist())
            self.position += take
        return np.array(picked)

    def update(self) -> dict:
        """One Adam step on the next batch of pairs. Returns the logged metrics (the whole batch's, on every
        rank)."""
        cfg, start, data = self.config, time.perf_counter(), self.train_pairs
        batch = self._next_batch()  # the whole batch, the same on every rank
        mine = np.split(batch, self.ranks.world_size)[self.ranks.rank]  # this rank's share
        self.lm.eval()  # dropout off: the policy's log-probs are comparable with the reference's
        self.optimizer.zero_grad(set_to_none=True)
        parts = {key: [] for key in ("losses", "chosen", "rejected", "chosen_logps", "rejected_logps")}
        finite = True
        for micro in np.split(mine, len(mine) // (cfg.micro_batch_size or len(mine))):
            rows = np.concatenate([micro, micro + data.n])  # chosen, then rejected: one forward
            with autocast(self.device):
                logps = sequence_logprobs(self.lm, self.backend, data.text, rows)  # (2m,) fp32
            chosen, rejected = logps[: len(micro)], logps[len(micro):]
            ref = data.ref_logps[torch.as_tensor(rows, device=self.device)]
            losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref[: len(micro)],
                                                                ref[len(micro):], self.beta, cfg.loss_type,
                                                                cfg.label_smoothing)
            loss = losses.sum() / len(batch)  # the whole batch's mean: the ranks' gradients add up to it
            if not torch.isfinite(loss):
                finite = False
                if self.sharded is None:
                    break
                # FSDP: every rank runs every backward (each one a collective); the step is skipped below
            loss.backward()
            for key, value in [("losses", losses), ("chosen", chosen_rewards), ("rejected", rejected_rewards),
                               ("chosen_logps", chosen), ("rejected_logps", rejected)]:
                parts[key].append(value.detach())
        grad_norm = clipped_step(self.optimizer, self.params, cfg.max_grad_norm, finite, self.ranks,
                                 self.sharded is not None)
        skipped = grad_norm is None  # parameters stay as they are
        self.num_updates += 1
        self.num_timesteps += len(batch)
        seconds = time.perf_counter() - start
        # Every rank's pairs, in rank order (the batch's order): the same metrics on every rank.
        gathered = self.ranks.gather({k: torch.cat(v).cpu() for k, v in parts.items() if v})
        parts = {k: torch.cat([g[k] for g in gathered if k in g]) for k in parts if any(k in g for g in gathered)}
        metrics = {"time/updates": self.num_updates, "time/timesteps": self.num_timesteps, "train/epoch": self.epoch,
                   **self._pair_stats({k: parts.get(k, torch.full((1,), float("nan")))
                                       for k in ("losses", "chosen", "rejected", "chosen_logps", "rejected_logps")}),
                   "train/grad_norm": float("nan") if grad_norm is None else grad_norm,
                   "train/skipped": int(skipped), "time/pairs_per_s": len(batch) / seconds,
                   "time/update_seconds": seconds}
        self.logger.log(metrics)
        return metrics

    @staticmethod
    def _pair_stats(parts: dict[str, torch.Tensor]) -> dict:
        """TRL's names: implicit rewards β·(log π − log π_ref) of chosen and rejected, their margin and accuracy."""
        margin = parts["chosen"] - parts["rejected"]
        return {"loss/dpo": parts["losses"].mean().item(), "rewards/chosen": parts["chosen"].mean().item(),
                "rewards/rejected": parts["rejected"].mean().item(), "rewards/margins": margin.mean().item(),
                "rewards/accuracies": ((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item(),
                "logps/chosen": parts["chosen_logps"].mean().item(),
                "logps/rejected": parts["rejected_logps"].mean().item()}

    @torch.no_grad()
    def evaluate_preferences(self, batch_size: int = 256) -> dict:
        """Held-out pairs: the DPO loss, implicit-reward margin and accuracy (the share of pairs whose chosen
        response gets the higher implicit reward, ties counting half: π = π_ref scores 0.5, chance)."""
        data = self.eval_pairs
        if data is None:
            return {}
        self.lm.eval()
        indices = np.arange(data.n)
        parts = {key: [] for key in ("losses", "chosen", "rejected", "chosen_logps", "rejected_logps")}
        for chunk in np.array_split(indices, max(1, data.n // batch_size)):
            rows = np.concatenate([chunk, chunk + data.n])
            logps = sequence_logprobs(self.lm, self.backend, data.text, rows)
            ref = data.ref_logps[torch.as_tensor(rows, device=self.device)]
            losses, chosen, rejected = dpo_loss(logps[: len(chunk)], logps[len(chunk):], ref[: len(chunk)],
                                                ref[len(chunk):], self.beta, self.config.loss_type,
                                                self.config.label_smoothing)
            for key, value in [("losses", losses), ("chosen", chosen), ("rejected", rejected),
                               ("chosen_logps", logps[: len(chunk)]), ("rejected_logps", logps[len(chunk):])]:
                parts[key].append(value)
        stats = self._pair_stats({k: torch.cat(v) for k, v in parts.items()})
        return {f"eval_{key}": value for key, value in stats.items()}  # e.g. eval_rewards/accuracies

    # ---------------------------------------------------------------- acting and checkpoints
    def predict(self, observation: dict, deterministic: bool = False) -> tuple[np.ndarray, None]:
        """The next token for an env observation (one, or a batch), SB3-style: ``(action, None)``."""
        return predict(self, observation, deterministic)

    def save(self, directory: str | Path) -> None:
        """Policy (safetensors), optimizer, RNG states, the order of the pairs and where we are in it, counters,
        β, config and the env's settings, as one checkpoint written in one step (`agents.checkpoint`)."""
        save_checkpoint(self, directory, "dpo", {"order": torch.from_numpy(self.order)},
                        {"position": self.position, "epoch": self.epoch, "beta": self.beta})

    @classmethod
    def load(cls, directory: str | Path, env, out_dir: str | Path | None = None, progress: bool = True,
             fsdp: bool = False) -> DPO:
        """Resume from `save` in `env`, built like the original (same task, reference and β) with the same pairs.

        Check-then-change: a damaged checkpoint, another env, β or number of pairs raises `ValueError` and leaves
        the env as it was. With `out_dir`, its ``metrics.jsonl`` continues from the checkpoint's update. `fsdp`
        shards the resumed agent (`agents.fsdp`), whether or not the saved run was sharded."""
        def own(agent, checkpoint):
            if checkpoint.meta.get("beta") != agent.beta:
                raise ValueError(f"{checkpoint.directory} was trained with β = {checkpoint.meta.get('beta')}, the "
                                 f"env has β = {agent.beta}")
            if not 0 <= checkpoint.meta.get("position", -1) <= len(agent.train_pairs):
                raise ValueError(f"{checkpoint.directory}: position {checkpoint.meta.get('position')} is not within "
                                 f"the {len(agent.train_pairs)} training pairs")
            return {"order": torch.from_numpy(agent.order)}

        def write_own(agent, checkpoint):
            agent.order = checkpoint.tensors["order"].cpu().numpy()
            agent.position, agent.epoch = checkpoint.meta["position"], checkpoint.meta["epoch"]

        return load_agent(cls, DPOConfig, "dpo", directory, env, out_dir, progress, fsdp, own, write_own)


def main(argv: list[str] | None = None) -> dict | list[str]:
    return run_command(DPO, DPOConfig, "DPO on the task's preference pairs, evaluated like the RL agents", argv,
                       extra_eval=lambda agent: agent.evaluate_preferences())


if __name__ == "__main__":
    main()
