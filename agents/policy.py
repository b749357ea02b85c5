"""The LM policy with a value head: the actor is the env's acting policy (trained in place), the critic reads either
the same trunk or a trunk of its own.

Legend: ``B`` episodes, ``P`` query tokens (left-padded), ``T`` response tokens (right-padded), ``V`` vocabulary,
``H`` hidden width.
"""

from __future__ import annotations

import copy
import math
from typing import Literal, get_args

import torch
from torch import nn

from rlhf_env.decoding.gpt2 import gpt2_response_forward
from rlhf_env.lm import position_ids, response_columns
from rlhf_env.lora import is_peft_model

ValueInit = Literal["zero", "small", "reward_model"]
VALUE_INITS = get_args(ValueInit)


def response_logits(lm: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor,
                    response_mask: torch.Tensor, backend: str, temperature: float = 1.0,
                    output_hidden_states: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training forward of every agent here: the logits that chose each response token, at the sampling
    temperature, ``(B, T, V)`` in fp32, and (when asked, else None) the final hidden states ``(B, P + T, H)`` over
    the query + response layout.

    `backend` is the one the env decided for its policy (``env.unwrapped.world.backends["policy"]``): ``"gpt2"``
    trains through `rlhf_env.decoding.gpt2.gpt2_response_forward` (transformers' arithmetic with a fraction of its
    overhead: an RLOO update's forward + backward measured 27 ms against 33 ms), ``"hf"`` through the model's own
    forward."""
    input_ids = torch.cat([query_ids, responses], dim=1)  # (B, P + T)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)  # (B, P + T)
    width = query_ids.shape[1]
    if backend == "gpt2":
        logits, hidden = gpt2_response_forward(lm, input_ids, attention_mask, width)
    else:
        out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                 output_hidden_states=output_hidden_states)
        logits, hidden = response_columns(out.logits, width), out.hidden_states[-1] if output_hidden_states else None
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    return logits, hidden if output_hidden_states else None


class ActorCritic(nn.Module):
    """A causal LM (the actor) and a scalar value head (the critic) over its response tokens.

    Args:
        lm: the causal LM; pass ``env.unwrapped.policy`` so that the env acts with the weights being trained.
        backend: how `lm` runs (``env.unwrapped.world.backends["policy"]``, see `response_logits`).
        value_init: ``"zero"`` (values start at 0), ``"small"`` (head ~ N(0, 1/(H+1)), as lm-human-preferences
            initialises reward heads) or ``"reward_model"`` (the critic starts as the reward model: its trunk and
            head, offset included; needs ``separate_critic=True`` and ``reward_model``).
        separate_critic: give the critic its own trunk (a copy of the LM's, or the reward model's) instead of
            sharing the actor's; the value loss then cannot disturb the policy's features.
        reward_model: the env's `RewardModel`, only read for ``value_init="reward_model"``.
    """

    def __init__(self, lm: nn.Module, backend: str, value_init: ValueInit = "zero", separate_critic: bool = False,
                 reward_model: nn.Module | None = None):
        super().__init__()
        if value_init not in VALUE_INITS:
            raise ValueError(f"value_init must be one of {VALUE_INITS}, got {value_init!r}")
        if value_init == "reward_model" and (not separate_critic or reward_model is None):
            raise ValueError("value_init='reward_model' needs separate_critic=True and the env's reward model "
                             "(the reward model's trunk is not the policy's)")
        if separate_critic and is_peft_model(lm):
            raise ValueError("separate_critic=True copies the policy's trunk, and a LoRA policy's trunk is the whole "
                             "base model: use the shared value head (separate_critic=False)")
        self.lm, self.backend = lm, backend
        self.critic_trunk = None
        if separate_critic:
            source = reward_model.trunk if value_init == "reward_model" else lm.base_model
            self.critic_trunk = copy.deepcopy(source)
            for p in self.critic_trunk.parameters():
                p.requires_grad_(True)
        hidden = (self.critic_trunk or lm).config.hidden_size
        self.value_head = nn.Linear(hidden, 1).to(next(lm.parameters()).device)
        with torch.no_grad():
            if value_init == "reward_model":
                self.value_head.weight.copy_(reward_model.head.weight)
                self.value_head.bias.copy_(reward_model.head.bias - reward_model.offset)
            elif value_init == "small":
                nn.init.normal_(self.value_head.weight, std=1 / math.sqrt(hidden + 1))
                nn.init.zeros_(self.value_head.bias)
            else:
                nn.init.zeros_(self.value_head.weight)
                nn.init.zeros_(self.value_head.bias)

    def forward(self, query_ids: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor,
                response_mask: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the sampling temperature ``(B, T, V)`` and values ``(B, T)`` for each response token's state.

        The value at token t estimates the return from the state before token t (the same column as the logits
        that choose token t).
        """
        shared = self.critic_trunk is None
        # hidden: (B, P + T, H) after the final norm
        logits, hidden = response_logits(self.lm, query_ids, query_mask, responses, response_mask, self.backend,
                                         temperature, output_hidden_states=shared)
        width = query_ids.shape[1]
        if not shared:
            input_ids = torch.cat([query_ids, responses], dim=1)  # (B, P + T)
            attention_mask = torch.cat([query_mask, response_mask], dim=1)  # (B, P + T)
            hidden = self.critic_trunk(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids(attention_mask)).last_hidden_state
        values = self.value_head(response_columns(hidden, width).to(self.value_head.weight.dtype))[..., 0]
        return logits, values.float()  # (B, T, V), (B, T)

    def critic_state_dict(self) -> dict[str, torch.Tensor]:
        """The critic's own tensors (value head, and the separate trunk if any): what a checkpoint adds to the LM."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("lm.")}
