"""The reward model: an LM trunk plus a scalar head read at the last real token (the response's EOS); loading,
saving and scoring. Training lives in `rlhf_env.pipeline.reward_training`.

Legend: ``B`` sequences, ``L`` tokens, ``H`` hidden size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel

from rlhf_env.decoding.gpt2 import GPT2Stack
from rlhf_env.files import atomic_directory
from rlhf_env.lm import position_ids
from rlhf_env.models import check_loading_info, check_safe_weights, choose_backend, quiet_loading

HEAD_FILE = "reward_head.safetensors"
CONFIG_FILE = "reward_config.json"


class RewardModel(nn.Module):
    """Scalar reward r(x, y) = head(h_last) − offset, where h_last is the trunk's hidden state at the last real token.

    The trunk is any transformers base model (`AutoModel`); ours is a tiny GPT-2.
    """

    def __init__(self, trunk: nn.Module, offset: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.trunk = trunk
        hidden = trunk.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        # Small head init, as in openai/lm-human-preferences (std 1/sqrt(H + 1)): scores start near 0.
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.head.bias)
        self.register_buffer("offset", torch.tensor(float(offset)))
        self.backend = choose_backend(trunk, backend)  # how `score` runs the trunk (`forward` always runs its own)

    @property
    def config(self):
        return self.trunk.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores ``(B,)`` for sequences ``(B, L)`` under any padding (read at each row's last real token), through
        the trunk's own forward: differentiable, what training uses."""
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids(attention_mask)).last_hidden_state  # (B, L, H)
        return self._head(hidden[torch.arange(hidden.shape[0], device=hidden.device), _last(attention_mask)])

    @torch.no_grad()
    def score(self, query_ids, query_mask, response_ids, response_mask, backend: str | None = None) -> torch.Tensor:
        """Scores ``(B,)`` of left-padded queries followed by right-padded responses, without gradients. `backend`
        (default: the one decided at construction): ``"gpt2"`` runs the trunk on the lean path of
        `rlhf_env.decoding.gpt2` (same arithmetic, a fraction of the Python; the last block on the read column
        only), ``"hf"`` through `forward`."""
        input_ids, attention_mask = torch.cat([query_ids, response_ids], 1), torch.cat([query_mask, response_mask], 1)
        if (backend or self.backend) == "hf":
            return self(input_ids, attention_mask)
        h_last = GPT2Stack([self.trunk]).hidden_states(input_ids, attention_mask, columns=_last(attention_mask))
        return self._head(h_last[0, :, 0])  # (B, H) -> (B,)

    def _head(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.head(h_last.to(self.head.weight.dtype))[:, 0].float() - self.offset  # (B,)

    def save_pretrained(self, directory: str | Path) -> None:
        """Trunk via `save_pretrained` (safetensors), head as safetensors, offset as JSON, written in one step
        (`rlhf_env.files.atomic_directory`). `ValueError` for a folder that holds files but is not a reward model
        (nothing of it is replaced)."""
        directory = Path(directory)
        if directory.is_dir() and any(directory.iterdir()) and not (directory / CONFIG_FILE).is_file():
            raise ValueError(f"{directory} holds files that are not a saved reward model; refusing to replace them")
        with atomic_directory(directory) as tmp:
            self.trunk.save_pretrained(tmp, safe_serialization=True)
            save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()}, tmp / HEAD_FILE)
            (tmp / CONFIG_FILE).write_text(json.dumps({"offset": float(self.offset)}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, device="cpu", dtype=None, trust_remote_code: bool = False,
                        backend: str = "auto"):
        """Load a reward model saved by `save_pretrained` (safetensors only), in eval mode.

        `ValueError` for a folder without safetensors weights or the head, a trunk whose weights do not match its
        config (`rlhf_env.models.check_loading_info`; a causal LM's ``lm_head`` beside the trunk is ignored), or a
        ``reward_config.json`` that is not a JSON object with a numeric ``"offset"``."""
        directory = Path(directory)
        check_safe_weights(directory)
        if not (directory / HEAD_FILE).is_file():
            raise ValueError(f"{directory} has no {HEAD_FILE}: not a reward model saved by rlhf-gym")
        offset = _read_offset(directory / CONFIG_FILE)
        with quiet_loading():
            trunk, info = AutoModel.from_pretrained(directory, use_safetensors=True, dtype=dtype,
                                                    trust_remote_code=trust_remote_code, output_loading_info=True,
                                                    local_files_only=True)
        check_loading_info(directory, info, allowed_unexpected=("lm_head.",))
        model = cls(trunk, offset=offset, backend=backend)
        model.head.load_state_dict(load_file(directory / HEAD_FILE))
        return model.to(device).eval()


def _read_offset(file: Path) -> float:
    """The ``"offset"`` of a ``reward_config.json``, or `ValueError` naming the file and the field."""
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{file} is not a readable JSON file: {error}") from error
    offset = config.get("offset") if isinstance(config, dict) else None
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise ValueError(f"{file}: field 'offset' must be a finite number, got {offset!r}")
    return float(offset)


def _last(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's last real column ``(B,)`` under any padding."""
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask * columns).argmax(-1)
