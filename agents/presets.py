"""The published critic-free recipes as named `agents.reinforce.ReinforceConfig` settings:
``ReinforceConfig.preset("dapo", samples_per_prompt=16)``, or ``python -m agents.reinforce --preset dapo``.

Each preset sets every field of the loss (so it is the same whatever the defaults are) and nothing else: the sizes
(``episodes_per_update``, ``samples_per_prompt``), the step size and the env stay the caller's. Where a paper pays
the KL matters, and is the env's business: GRPO pays β·KL in the loss, so its env must have β = 0 (the agent
refuses anything else, `agents.reinforce.KLPaidTwice`); RLOO and REINFORCE++ pay it in the reward, at the env's β
(the env's default k1 estimator); Dr. GRPO and DAPO train without one (β = 0 for the papers' setting). What each
paper sets around its loss (group size, β, step size, lengths): docs/agents.md, "Loss options and presets".

* ``grpo``, Shao et al. 2024, "DeepSeekMath" (eqs. 3-4, §4.1-4.2): advantages (G − mean)/std over the prompt's group
  (`agents.core.group_mean`, Bessel-corrected std), each episode's token mean averaged over episodes, a clipped ratio
  with ε = 0.2, and β·k3 in the loss with β = 0.04. The paper takes one update per exploration stage (μ = 1), so
  the ratio is 1 and the clip inert: the gradient is REINFORCE's.
* ``dr_grpo``, Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective": GRPO without its two
  normalisations (the group std and 1/|y_i|): G − mean, each episode's token sum divided by the constant longest
  response (the env's ``max_new_tokens``), averaged over episodes; ε = 0.2; no KL term.
* ``dapo``, Yu et al. 2025, "DAPO" (§3.1, §3.3): clip-higher (ε_low = 0.2, ε_high = 0.28), the token-level loss
  (every token of the minibatch weighted alike), GRPO's (G − mean)/std, no KL term, 16 gradient steps per rollout
  batch (minibatches of 1/16 of it). Dynamic sampling (§3.2) is ``drop_uniform_groups=True``, which leaves groups
  with equal returns out instead of sampling more prompts to refill the batch; the overlong reward shaping (§3.4) is
  not a loss setting and is not here.
* ``rloo``, Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
  Feedback in LLMs": the leave-one-out baseline, the whole response as one action (the sequence's log-probability:
  its token sum, averaged over episodes), one on-policy step, no clip; the KL in the reward. The defaults.
* ``reinforce_pp``, Hu 2025, "REINFORCE++": no baseline; the token-level k1 KL in the reward, reward-to-go with
  γ = 1, the advantages whitened over the whole batch's tokens, PPO's clipped ratio (ε = 0.2) on a token mean.
"""

from __future__ import annotations

_LOSS = dict(baseline="rloo", advantage_norm="none", reward_to_go=False, loss_aggregation="seq_mean_token_sum",
             clip_range=None, clip_range_low=None, clip_range_high=None, ratio_level="token", update_epochs=1,
             num_minibatches=1, kl_in_loss=False, kl_estimator="k3", drop_uniform_groups=False)
"""Every loss field, at the plain REINFORCE (RLOO) settings each preset starts from."""

PRESETS: dict[str, dict] = {
    "grpo": _LOSS | dict(baseline="group_mean", advantage_norm="group_std", loss_aggregation="seq_mean_token_mean",
                         clip_range=0.2, kl_in_loss=True, kl_estimator="k3", kl_coef=0.04),
    "dr_grpo": _LOSS | dict(baseline="group_mean", loss_aggregation="seq_mean_token_sum_norm", clip_range=0.2),
    "dapo": _LOSS | dict(baseline="group_mean", advantage_norm="group_std", loss_aggregation="token_mean",
                         clip_range_low=0.2, clip_range_high=0.28, num_minibatches=16),
    "rloo": dict(_LOSS),
    "reinforce_pp": _LOSS | dict(baseline="none", reward_to_go=True, advantage_norm="batch",
                                 loss_aggregation="token_mean", clip_range=0.2),
}
"""Preset name → the `ReinforceConfig` fields it sets (see the module docstring for each one's source)."""
