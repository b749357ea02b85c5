"""What every LM agent here shares outside its update: config checks, the learn loop, the batch layout of
episodes, the optimizer step, acting, checkpoints and the command line. Plain functions (no base class): each agent
module calls them by name and keeps its own state, listed in its ``__init__``.

An agent, for these functions, has ``config`` (a frozen dataclass), ``envs`` and ``world``, ``lm`` (the env's
acting policy, trained in place), ``optimizer``, ``ranks`` (`agents.distributed.Ranks`), ``sharded`` (its FSDP
units, `agents.fsdp.Sharded`, or None), ``rng`` (numpy) and ``generator`` (torch), this rank's streams,
``shared_rng`` (numpy, the same on every rank), ``logger``, the counters ``num_timesteps`` / ``num_updates`` /
``num_episodes`` (over all ranks) and ``update() -> dict``.

Legend: ``B`` episodes, ``P`` query tokens (left-padded), ``T`` response tokens (right-padded).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import json
import math
import textwrap
import time
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from agents.distributed import SINGLE, Ranks, init_from_environment, rank_generators, rank_share, shut_down
from agents.fsdp import Sharded
from agents.metrics import diagnose, read_history
from agents.rollout import Episodes, collect_episodes, unwrap_vector_env
from rlhf_env.decoding.sampling import gumbel_max
from rlhf_env.files import atomic_write
from rlhf_env.lm import pad_left, pad_right
from rlhf_env.vector_env import RLHFVectorEnv
from rlhf_env.world import RLHFWorld, checked_integer


def exact_div(a: int, b: int, what: str) -> int:
    if b <= 0 or a % b:
        raise ValueError(f"{what}: {a} is not a multiple of {b}")
    return a // b


def check_field(config, name: str, ok, expected: str) -> None:
    """`ValueError` naming the config field `name` unless ``ok(value)``: configs refuse at construction what would
    otherwise crash, or silently do nothing sensible, mid-training."""
    value = getattr(config, name)
    if not ok(value):
        raise ValueError(f"{type(config).__name__}.{name} must be {expected}, got {value!r}")


def positive(value) -> bool:
    return value > 0 and math.isfinite(value)


def non_negative(value) -> bool:
    return value >= 0 and math.isfinite(value)


def at_least_one(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def unit_interval(value) -> bool:
    return 0 <= value <= 1


def none_or(check):
    return lambda value: value is None or check(value)


# ---------------------------------------------------------------- training
def acting_world(env, name: str, episodes_per_update: int | None,
                 ranks: Ranks = SINGLE) -> tuple[RLHFVectorEnv, RLHFWorld]:
    """The native vector env under `env` and its world, checked for an agent that trains the env's acting policy
    (it must have one) with rollouts that run every row once (each rank's share ``episodes_per_update / W`` a
    multiple of ``num_envs``; the whole batch no longer than an adaptive β's horizon)."""
    envs = unwrap_vector_env(env)
    world = envs.world
    if world.policy is None:
        raise ValueError(f"{name} trains the env's acting policy: make the env with kl_mode='policy' (the default)")
    if episodes_per_update is not None:
        share = rank_share(episodes_per_update, ranks, "episodes_per_update")
        if ranks.single:
            exact_div(episodes_per_update, envs.num_envs, "episodes_per_update / num_envs")
        else:
            exact_div(share, envs.num_envs, f"each of the {ranks.world_size} ranks collects episodes_per_update / "
                                            f"{ranks.world_size} episodes per update with its env: share / num_envs")
        horizon = getattr(world.kl_controller, "horizon", None)  # an adaptive β moves once per rollout
        if horizon is not None and episodes_per_update > horizon:
            raise ValueError(f"episodes_per_update ({episodes_per_update}) must not exceed the env's kl_horizon "
                             f"({horizon}): β moves once per rollout by up to 0.2·episodes/horizon")
    return envs, world


def adam(params: list[torch.nn.Parameter], config) -> torch.optim.Adam:
    """Adam on `params` with ``config.learning_rate`` and ``config.adam_eps`` (constant step size)."""
    return torch.optim.Adam(params, lr=config.learning_rate, eps=config.adam_eps)


def seeded_generators(seed: int, ranks: Ranks = SINGLE) -> tuple[np.random.Generator, np.random.Generator,
                                                                   torch.Generator]:
    """An agent's ``(rng, shared_rng, generator)``: this rank's numpy stream (prompts, seeds of rollouts), the numpy
    stream every rank shares (minibatch orders, demonstrations, DPO's order of the pairs) and this rank's torch
    generator (sampling). One process: one numpy generator seeded with `seed` serves as both numpy streams;
    W > 1 ranks: `agents.distributed.rank_generators` for the rank's, ``default_rng(seed)`` for the shared one."""
    rng, generator = rank_generators(seed, ranks)
    return rng, (rng if ranks.single else np.random.default_rng(seed)), generator


def train_module(agent, module: torch.nn.Module,
                 fsdp: bool = False) -> tuple[list[torch.nn.Parameter], Sharded | None, torch.optim.Adam]:
    """What an agent trains `module` (the policy, or the policy with its critic) with: ``(params, sharded,
    optimizer)``. Every rank's `module` is made rank 0's first (`check_ranks_agree`); with `fsdp` it is then cut
    over the ranks (`agents.fsdp.Sharded`), and ``params`` (what Adam steps) are this rank's shards."""
    check_ranks_agree(agent, module)
    sharded = Sharded(module, agent.world.device, agent.ranks.world_size) if fsdp else None
    params = [p for p in module.parameters() if p.requires_grad]
    return params, sharded, adam(params, agent.config)


def check_ranks_agree(agent, module: torch.nn.Module) -> None:
    """Every rank of a data-parallel agent has the same config and the same training problem
    (`agents.distributed.RanksDisagree` otherwise, on every rank); then `module`'s parameters, what the agent
    trains, are rank 0's on every rank (broadcast, as DDP does)."""
    ranks, world = agent.ranks, agent.world
    if ranks.single:
        return
    ranks.check_same("configs", asdict(agent.config))
    ranks.check_same("env settings", {
        "task": world.task.name, "kl_mode": world.kl_mode, "kl_estimator": world.kl_estimator,
        "temperature": world.temperature, "max_new_tokens": world.max_new_tokens,
        "missing_eos_penalty": world.missing_eos_penalty, "nonfinite_reward": world.nonfinite_reward,
        "kl_controller": world.kl_controller.state_dict(), "reward_names": world.reward_names,
        "device_type": world.device.type,
        "trained_parameters": [tuple(p.shape) for p in module.parameters() if p.requires_grad]})
    ranks.broadcast_module(module)


def clipped_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_grad_norm: float,
                 finite: bool = True, ranks: Ranks = SINGLE, sharded: bool = False) -> float | None:
    """Sum the accumulated gradients over the ranks (`agents.distributed.Ranks.sum_gradients`; nothing in one
    process, nor for `sharded` FSDP gradients, which its reduce-scatter summed), clip them to global norm
    `max_grad_norm` and take the optimizer step; returns the norm before clipping, the same on every rank. A loss
    that was not finite on some rank (``finite=False`` there) or a non-finite norm skips the step on every rank
    instead: the gradients are dropped, the parameters stay as they are, and None is returned."""
    if ranks.all(finite):
        if not sharded:
            ranks.sum_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if sharded:  # a DTensor: the norm over every rank's slices, whole on each rank
            grad_norm = grad_norm.full_tensor()
        if torch.isfinite(grad_norm):
            optimizer.step()
            return grad_norm.item()
    optimizer.zero_grad(set_to_none=True)
    return None


def learn_loop(agent, total_timesteps: int, callback=None, progress: bool = True, unit: str = "tok",
               shown: tuple[str, ...] = ("objective/score", "objective/gold_score", "objective/kl")):
    """Call ``agent.update()`` until ``agent.num_timesteps`` reaches `total_timesteps` (for the RL agents, env steps:
    generated tokens, idle rows included); the progress bar counts `unit` and shows the metrics `shown`.

    ``callback(agent, metrics)`` runs after every update; returning False stops training (on every rank of a
    data-parallel run, if it returns False on any, so a callback on some ranks only, e.g. rank 0's evaluations, is
    fine; only rank 0 shows the progress bar).
    """
    total_timesteps = checked_integer("total_timesteps", total_timesteps, minimum=0)
    bar = tqdm(total=total_timesteps, initial=min(agent.num_timesteps, total_timesteps), unit=unit,
               disable=not (progress and agent.ranks.is_main))
    while agent.num_timesteps < total_timesteps:
        metrics = agent.update()
        bar.update(min(metrics["time/timesteps"], total_timesteps) - bar.n)
        bar.set_postfix({k.split("/")[1]: round(metrics[k], 3) for k in shown})
        stop = callback is not None and callback(agent, metrics) is False
        if agent.ranks.any(stop):  # every rank takes part, with or without a callback of its own
            break
    bar.close()
    return agent


def rollout(agent, prompts: list[str] | None = None) -> Episodes:
    """This rank's share of the batch, ``config.episodes_per_update / W`` episodes from ``agent.envs`` (all of it in
    one process); `prompts` (one per episode) pins them.

    β is the same for every episode of the rollout and moves once after it, from the whole batch's KL (every
    rank's episodes, so β stays the same on every rank; the discarded autoreset episodes of idle rows never move
    it): one KL-controller step per batch, as in Ziegler et al. (2019, §2.2). Under FSDP the policy is gathered
    whole for the rollout (`full_parameters`)."""
    envs, episodes = agent.envs, Episodes()
    n = envs.num_envs
    with agent.world.beta_frozen(), full_parameters(agent):
        for start in range(0, agent.config.episodes_per_update // agent.ranks.world_size, n):
            rows = None if prompts is None else prompts[start: start + n]
            episodes.extend(collect_episodes(envs, int(agent.rng.integers(2**31 - 1)), agent.generator,
                                             prompts=rows))
    agent.world.update_beta([kl for kls in agent.ranks.gather(episodes.kls) for kl in kls])
    return episodes


def full_parameters(agent):
    """A context in which the agent's trained modules are whole on every rank: under FSDP its units gathered once
    (`agents.fsdp.Sharded.full_parameters`, a collective every rank enters), so that the env can decode with them;
    nothing to do otherwise."""
    return agent.sharded.full_parameters() if agent.sharded is not None else contextlib.nullcontext()


def whole_batch(episodes: Episodes, ranks: Ranks) -> Episodes:
    """Every rank's `episodes` in one `Episodes`, in rank order (the batch's order): `episodes` itself in one
    process. The batch's metrics are computed from it, the same on every rank."""
    if ranks.single:
        return episodes
    everything = Episodes()
    for part in ranks.gather(episodes):
        everything.extend(part)
    return everything


def given_episodes(agent, episodes: Episodes) -> Episodes:
    """`episodes` passed to ``update(episodes)``, checked: an `Episodes` with this rank's share of the batch
    (``episodes_per_update / W``) whose per-token lists match each response. `ValueError` otherwise, before any
    model call."""
    if not isinstance(episodes, Episodes):
        raise ValueError(f"update(episodes=...) takes an agents.rollout.Episodes, got {type(episodes).__name__}")
    share = agent.config.episodes_per_update // agent.ranks.world_size
    if len(episodes) != share:
        raise ValueError(f"update(episodes=...) needs this rank's share of the batch, {share} episodes "
                         f"(episodes_per_update / {agent.ranks.world_size} ranks); got {len(episodes)}")
    for name in ("prompts", "queries", "logprobs", "rewards", "scores", "kls", "score_nonfinite"):
        if len(getattr(episodes, name)) != share:
            raise ValueError(f"update(episodes=...): episodes.{name} has {len(getattr(episodes, name))} entries for "
                             f"{share} responses")
    for i, response in enumerate(episodes.responses):
        if not response or len(episodes.logprobs[i]) != len(response) or len(episodes.rewards[i]) != len(response):
            raise ValueError(f"update(episodes=...): episode {i} has {len(response)} response tokens, "
                             f"{len(episodes.logprobs[i])} log-probs and {len(episodes.rewards[i])} rewards")
    return episodes


@dataclass
class Batch:
    """Episodes as padded tensors: queries left-padded, responses and per-token floats right-padded, 0 on padding.

    ``rewards`` are the env's per-token rewards (−β·KL_t, plus the score at the last token). ``valid`` is False for
    episodes whose score the env masked (``nonfinite_reward="mask"``): they carry no data for a loss.
    """

    query_ids: torch.Tensor  # (B, P)
    query_mask: torch.Tensor  # (B, P)
    responses: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T)
    rewards: torch.Tensor  # (B, T)
    env_logprobs: torch.Tensor  # (B, T) log π at sampling time (the env's forward)
    valid: torch.Tensor  # (B,) bool
    ref_logprobs: torch.Tensor  # (B, T) log π_ref of the sampled tokens (the env's forward of the reference)

    def text(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(query_ids, query_mask, responses, response_mask)`` of episodes `rows`: a training forward's input."""
        rows = torch.as_tensor(rows, device=self.query_ids.device)
        return self.query_ids[rows], self.query_mask[rows], self.responses[rows], self.response_mask[rows]


def batch_tensors(episodes: Episodes, pad_token_id: int, device: torch.device,
                  score_clip: float | None = None) -> Batch:
    """`Episodes` as a `Batch`; with `score_clip` only the score part of the last reward is clipped to
    ±score_clip (the KL part never is)."""
    query_ids, query_mask = pad_left(episodes.queries, pad_token_id, device)  # (B, P)
    responses, response_mask = pad_right(episodes.responses, pad_token_id, device=device)  # (B, T)
    width = responses.shape[1]

    def floats(rows):  # ragged per-token floats → (B, T), 0 on padding
        out = torch.zeros((len(rows), width), device=device)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, device=device)
        return out

    rewards = floats(episodes.rewards)
    if score_clip is not None:
        last = response_mask.sum(1) - 1
        scores = torch.tensor(episodes.scores, device=device)
        clipped = scores.clamp(-score_clip, score_clip)
        rewards[torch.arange(len(scores), device=device), last] += clipped - scores
    valid = ~torch.tensor(episodes.score_nonfinite, dtype=torch.bool, device=device).reshape(-1)
    return Batch(query_ids, query_mask, responses, response_mask, rewards, floats(episodes.logprobs), valid,
                 floats(episodes.ref_logprobs))


def autocast(device: torch.device):
    """A fresh context for the training forward: bf16 autocast on CUDA, nothing (fp32) elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


# ---------------------------------------------------------------- acting
@torch.no_grad()
def predict(agent, observation: dict, deterministic: bool = False) -> tuple[np.ndarray, None]:
    """The next token for an env observation (one, or a batch), SB3-style: ``(action, None)``."""
    device = agent.world.device
    ids = torch.as_tensor(np.asarray(observation["input_ids"]), device=device)
    attention = torch.as_tensor(np.asarray(observation["attention_mask"]), device=device)
    single = ids.ndim == 1
    ids, attention = (ids[None], attention[None]) if single else (ids, attention)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    logits = agent.lm(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    last = (attention * torch.arange(ids.shape[1], device=device)).argmax(1)  # last real token
    logp = torch.log_softmax(logits[torch.arange(ids.shape[0]), last].float() / agent.world.temperature, -1)
    actions = logp.argmax(-1) if deterministic else gumbel_max(logp.cpu(), agent.generator)
    actions = actions.cpu().numpy()
    return (actions[0] if single else actions), None


# ---------------------------------------------------------------- command line
def field_docs(config_cls) -> dict[str, str]:
    """Each dataclass field's docstring (the string literal under it, as the configs here document their fields)."""
    docs, body = {}, ast.parse(textwrap.dedent(inspect.getsource(config_cls))).body[0].body
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _flag(kind) -> dict:
    """argparse settings for a field annotated `kind`: choices for a Literal, None from "none" for ``X | None``."""
    args = typing.get_args(kind)
    if type(None) in args:  # X | None
        inner = _flag(next(a for a in args if a is not type(None)))
        parse = inner["type"]
        return dict(inner, type=lambda text: None if text.lower() == "none" else parse(text))
    if typing.get_origin(kind) is typing.Literal:
        return {"type": str, "choices": list(args)}
    if kind is bool:
        return {"type": lambda text: text.lower() in ("1", "true", "yes")}
    return {"type": kind}


def command_line(description: str, config_cls, presets: dict[str, dict] | None = None) -> argparse.ArgumentParser:
    """The flags every agent's command line takes, plus one per field of `config_cls` (its docstring as help) and,
    with `presets`, ``--preset NAME``, whose field values become the defaults that explicit flags override."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--task", default="sentiment", help="built-in task (sentiment, verbose, arithmetic)")
    parser.add_argument("--reward", choices=["rm", "gold"], default="rm", help="learned reward model or gold (-GT)")
    parser.add_argument("--total-timesteps", type=int, default=200_000,
                        help="training budget: env steps (tokens, idle rows included); DPO: preference pairs")
    parser.add_argument("--num-envs", type=int, default=None,
                        help="rows of each process's vector env (default: 64 / the number of torchrun processes)")
    parser.add_argument("--beta", type=float, default=None,
                        help="the env's KL coefficient β in the reward (the initial β with --kl-target); default 0.1, "
                             "or 0 when the config pays the KL in the loss")
    parser.add_argument("--kl-target", type=float, default=None, help="adaptive β toward this episode KL")
    parser.add_argument("--device", default="auto",
                        help="'auto' (CUDA when present), 'cpu', 'cuda', ...; under torchrun, cuda:LOCAL_RANK")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="directory for metrics.jsonl, the final model and summary")
    parser.add_argument("--eval-episodes", type=int, default=512, help="held-out episodes before and after training")
    parser.add_argument("--estimate-optimum", action="store_true",
                        help="also estimate the KL-regularised optimum of the gold reward (sampling from π_ref)")
    parser.add_argument("--diagnose", metavar="METRICS_JSONL", help="only diagnose an existing run and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=None,
                            help="a published recipe's settings as the defaults (docs/agents.md, 'Loss options and "
                                 "presets'); explicit flags override them")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard the trained model over the torchrun processes with FSDP2 (agents.fsdp)")
    docs, hints = field_docs(config_cls), typing.get_type_hints(config_cls)
    for f in fields(config_cls):
        help_text = docs.get(f.name, "").replace("%", "%%")  # argparse formats help strings with %
        parser.add_argument(f"--{f.name.replace('_', '-')}", default=f.default, help=help_text,
                            **_flag(hints[f.name]))
    return parser


def parse_command_line(description: str, config_cls, argv: list[str] | None = None,
                       presets: dict[str, dict] | None = None) -> argparse.Namespace:
    """`argv` parsed by `command_line`; with ``--preset NAME``, the preset's field values replace the defaults of
    the flags not given explicitly."""
    parser = command_line(description, config_cls, presets)
    args = parser.parse_args(argv)
    if presets and args.preset:
        parser.set_defaults(**presets[args.preset])
        args = parser.parse_args(argv)
    return args


def config_from_args(config_cls, args: argparse.Namespace):
    """The `config_cls` of the parsed flags (its checks raise `ValueError` naming a bad field)."""
    return config_cls(**{f.name: getattr(args, f.name) for f in fields(config_cls)})


def run_command(agent_cls, config_cls, description: str, argv: list[str] | None = None,
                extra_eval=None, presets: dict[str, dict] | None = None, loss_kl_coef=None) -> dict | list[str]:
    """Parse `argv`, train `agent_cls` on the task, evaluate before and after on held-out prompts, print and save
    a summary (``--diagnose FILE`` only diagnoses a finished run). ``extra_eval(agent) -> dict`` adds the agent's
    own held-out metrics to both evaluations. `presets` (name → field values) adds ``--preset``.
    ``loss_kl_coef(config) -> float | None`` is the KL coefficient the config pays in its loss (None: the KL is the
    env's, in the reward): the env's β then defaults to 0, and the summary's objective weighs the KL by β plus it.

    Under ``torchrun --nproc_per_node W`` (``WORLD_SIZE`` > 1) every process trains its share of each batch
    (`agents.distributed`): the process group is initialised here (gloo on the CPU, NCCL with one CUDA device per
    local rank) and closed at the end; rank 0 alone evaluates, prints and writes files. Every rank returns the
    summary. ``--fsdp`` also shards the trained model over the processes (`agents.fsdp`); every rank then gathers
    it whole around rank 0's evaluations."""
    import gymnasium as gym

    import rlhf_env
    from agents.evaluate import evaluate, kl_regularised_optimum

    args = parse_command_line(description, config_cls, argv, presets)
    preset = args.preset if presets else None
    if args.diagnose:
        flags = diagnose(read_history(args.diagnose))
        print("\n".join(flags) if flags else "no failure mode detected")
        return flags
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(config_cls, args)
    loss_beta = loss_kl_coef(config) if loss_kl_coef is not None else None
    beta = args.beta if args.beta is not None else (0.0 if loss_beta is not None else 0.1)
    kl_weight = beta + (loss_beta or 0.0)  # the β of the objective the run optimises: gold − β·KL
    task = rlhf_env.tasks.get_task(args.task)
    started = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    ranks, device = init_from_environment(args.device)
    started = started and not ranks.single  # this call initialised the process group: it closes it too
    finished = False
    try:
        num_envs = args.num_envs if args.num_envs is not None else max(1, 64 // ranks.world_size)
        kwargs = dict(beta=beta, kl_target=args.kl_target, device=device)
        if args.reward == "gold":
            kwargs["reward_fn"] = task.gold_reward
        envs = gym.make_vec(rlhf_env.env_id(args.task), num_envs=num_envs, **kwargs)
        agent = agent_cls(envs, config, out_dir=args.out, progress=not args.no_progress, fsdp=args.fsdp)
        main = ranks.is_main  # rank 0 evaluates (the same held-out episodes as one process would) and writes

        def evaluate_all():
            with full_parameters(agent):  # FSDP: every rank gathers, rank 0 evaluates
                if not main:
                    return None
                return {**evaluate(envs, args.eval_episodes, seed=10_000,
                                   beta=None if loss_beta is None else kl_weight),
                        **(extra_eval(agent) if extra_eval else {})}

        optimum = (kl_regularised_optimum(envs, task.gold_reward, kl_weight)
                   if args.estimate_optimum and main else None)
        before = evaluate_all()
        start = time.perf_counter()
        agent.learn(args.total_timesteps)
        seconds = time.perf_counter() - start
        after = evaluate_all()
        summary = None
        if main:
            summary = {"algorithm": agent_cls.__name__, "task": args.task, "reward": args.reward, "beta": beta,
                       **({"preset": preset} if preset else {}),
                       **({"kl_coef": loss_beta} if loss_beta is not None else {}),
                       "seed": config.seed, "processes": ranks.world_size, "fsdp": args.fsdp,
                       "timesteps": agent.num_timesteps,
                       "updates": agent.num_updates, "train_seconds": round(seconds, 1), "eval_before": before,
                       "eval_after": after,
                       # Share of the gap between π_SFT's held-out gold and the best reachable gold that training
                       # closed.
                       "gold_gap_closed": (after["objective/gold_score"] - before["objective/gold_score"])
                       / (task.best_gold - before["objective/gold_score"]),
                       "gold_objective": after["objective/gold_score"] - kl_weight * after["objective/kl"],
                       "kl_regularised_optimum": optimum, "diagnose": diagnose(agent.logger.history),
                       "config": asdict(config)}
        if args.out:
            agent.save(Path(args.out) / "model")  # every rank: each one's random streams go into the checkpoint
            if main:
                atomic_write(Path(args.out) / "summary.json", json.dumps(summary, indent=2))
        agent.logger.close()
        summary = ranks.broadcast(summary)
        if main:
            print(json.dumps(summary, indent=2))
        finished = True
        return summary
    finally:
        if started:
            shut_down(finished)
