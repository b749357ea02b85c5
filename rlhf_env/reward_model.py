"""The reward model: an LM trunk plus a scalar head read where a sequence classifier reads (the last non-pad real
token: the response's EOS); loading, saving and scoring. Training lives in `rlhf_env.pipeline.reward_training`.

On disk a reward model is a standard transformers sequence classifier with one label
(``AutoModelForSequenceClassification``, ``num_labels=1``: ``config.json`` + ``model.safetensors``, and a tokenizer
beside it when it has its own), so ``AutoModelForSequenceClassification.from_pretrained(folder)`` gives the same
scores as `RewardModel.from_pretrained(folder)`. The normalising offset is folded into the weights where the
architecture allows it (`fold_offset`: GPT-2's final layer-norm bias); elsewhere it stays in the config as
``reward_offset``, which rlhf-gym subtracts and a plain transformers load does not.

Legend: ``B`` sequences, ``L`` tokens, ``H`` hidden size.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from rlhf_env.decoding.gpt2 import GPT2Stack
from rlhf_env.files import atomic_directory
from rlhf_env.lm import pad_right, position_ids
from rlhf_env.models import check_loading_info, check_safe_weights, choose_backend, load_tokenizer, quiet_loading

OFFSET_FIELD = "reward_offset"
"""The ``config.json`` field holding what is subtracted from the classifier's logit (0 when folded into weights)."""
LEGACY_HEAD_FILE = "reward_head.safetensors"  # rlhf-gym 0.2: trunk + head file + reward_config.json
LEGACY_CONFIG_FILE = "reward_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# The trunk's final layer norm, whose bias can absorb a constant added to the score: w·(h + c·w/‖w‖²) = w·h + c.
# Only where the trunk's last hidden state is that norm's output (GPT-2's ``ln_f``).
FOLDABLE_NORMS = {"gpt2": "ln_f"}


class RewardModel(nn.Module):
    """Scalar reward r(x, y) = head(h) − offset, where h is the trunk's final hidden state at the column a
    transformers sequence classifier reads (`read_columns`).

    The trunk is any transformers base model (`AutoModel`); ours is a tiny GPT-2. `tokenizer`: the reward model's
    own tokenizer, when it is not the policy's (loaded from its folder by `from_pretrained`; None otherwise).
    """

    def __init__(self, trunk: nn.Module, offset: float = 0.0, backend: str = "auto", tokenizer=None):
        super().__init__()
        self.trunk = trunk
        hidden = trunk.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        # Small head init, as in openai/lm-human-preferences (std 1/sqrt(H + 1)): scores start near 0.
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.head.bias)
        self.register_buffer("offset", torch.tensor(float(offset)))
        self.backend = choose_backend(trunk, backend)  # how `score` runs the trunk (`forward` always runs its own)
        self.tokenizer = tokenizer

    @property
    def config(self):
        return self.trunk.config

    def read_columns(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The column ``(B,)`` each row is scored at, as transformers' ``*ForSequenceClassification`` reads the
        row's unpadded sequence: its last token whose id is not ``config.pad_token_id`` (the first token if every
        one is; the last token when the config has no pad id), under any padding (the mask marks real tokens)."""
        real = attention_mask.bool()
        pad = self.config.get_text_config().pad_token_id
        readable = real if pad is None else real & (input_ids != pad)
        columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (readable * columns).argmax(-1)
        return torch.where(readable.any(-1), last, real.long().argmax(-1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores ``(B,)`` for sequences ``(B, L)`` under any padding (read at `read_columns`), through the trunk's
        own forward: differentiable, what training uses."""
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids(attention_mask)).last_hidden_state  # (B, L, H)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self._head(hidden[rows, self.read_columns(input_ids, attention_mask)])

    @torch.no_grad()
    def score(self, query_ids, query_mask, response_ids, response_mask, backend: str | None = None) -> torch.Tensor:
        """Scores ``(B,)`` of left-padded queries followed by right-padded responses, without gradients
        (`score_sequences` of their concatenation)."""
        return self.score_sequences(torch.cat([query_ids, response_ids], 1), torch.cat([query_mask, response_mask], 1),
                                    backend)

    @torch.no_grad()
    def score_sequences(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        backend: str | None = None) -> torch.Tensor:
        """Scores ``(B,)`` of sequences ``(B, L)`` under any padding, without gradients. `backend` (default: the one
        decided at construction): ``"gpt2"`` runs the trunk on the lean path of `rlhf_env.decoding.gpt2` (same
        arithmetic, a fraction of the Python; the last block on the read column only), ``"hf"`` through
        `forward`."""
        if (backend or self.backend) != "gpt2":
            return self(input_ids, attention_mask)
        h = GPT2Stack([self.trunk]).hidden_states(input_ids, attention_mask,
                                                  columns=self.read_columns(input_ids, attention_mask))
        return self._head(h[0, :, 0])  # (B, H) -> (B,)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h.to(self.head.weight.dtype))[:, 0].float() - self.offset  # (B,)

    # --- the standard format ----------------------------------------------------------------------------------

    def fold_offset(self) -> bool:
        """Move ``head.bias − offset`` into the trunk's final layer-norm bias (``ln_f.bias += c·w/‖w‖²``, so that
        w·(h + δ) = w·h + c), leaving head bias and offset 0: the plain logit w·h is then the normalised score, as a
        saved classifier (no score bias) computes it. Same scores up to float rounding. True when done (or nothing
        to fold); False, and nothing changed, where the architecture has no such bias (`FOLDABLE_NORMS`) or the
        head weight is 0."""
        return _fold(self.trunk, self.head, self.offset)

    def to_classifier_state(self) -> tuple[type, object, dict[str, torch.Tensor]]:
        """``(classifier class, config, state dict)`` of this reward model as a transformers sequence classifier
        with one label: trunk weights under the class's base-model prefix, ``score.weight`` = the head's weight,
        the offset folded (`fold_offset`, on copies) or else recorded as ``config.reward_offset``."""
        trunk, head = copy.deepcopy(self.trunk).cpu(), copy.deepcopy(self.head).cpu()
        offset = self.offset.detach().cpu().clone()
        _fold(trunk, head, offset)
        config = copy.deepcopy(self.config)
        classifier_cls = _classifier_class(config)
        config.num_labels = 1
        config.architectures = [classifier_cls.__name__]
        prefix = classifier_cls.base_model_prefix
        state = {f"{prefix}.{k}": v.detach().contiguous() for k, v in trunk.state_dict().items()}
        state["score.weight"] = head.weight.detach().to(next(trunk.parameters()).dtype).contiguous()
        remaining = float(offset.double() - head.bias.detach().double())  # what the logit still carries
        setattr(config, OFFSET_FIELD, remaining)
        return classifier_cls, config, state

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> None:
        """Save as a transformers sequence classifier with one label (safetensors; module docstring), with
        `tokenizer` (default: the model's own, if any) beside it, written in one step
        (`rlhf_env.files.atomic_directory`). `ValueError` for a folder that holds files but is not a reward model
        (nothing of it is replaced)."""
        directory = Path(directory)
        if directory.is_dir() and any(directory.iterdir()) and not _is_reward_model_dir(directory):
            raise ValueError(f"{directory} holds files that are not a saved reward model; refusing to replace them")
        classifier_cls, config, state = self.to_classifier_state()
        with torch.device("meta"):  # no random init of weights that are replaced at once
            classifier = classifier_cls(config)
        classifier.load_state_dict(state, strict=True, assign=True)
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        with atomic_directory(directory) as tmp, quiet_loading():
            classifier.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

    @classmethod
    def from_classifier(cls, classifier: nn.Module, backend: str = "auto", tokenizer=None) -> RewardModel:
        """The reward model of a transformers sequence classifier with one label that reads the last token through
        a linear ``score`` layer (GPT-2, Llama, Qwen2, Mistral, GPT-NeoX ...): its base model is the trunk (shared,
        not copied), its ``score`` the head, ``config.reward_offset`` (default 0) the offset. `ValueError`
        otherwise."""
        config = getattr(classifier, "config", None)
        score = getattr(classifier, "score", None)
        if getattr(config, "num_labels", None) != 1:
            raise ValueError(f"a reward model is a sequence classifier with num_labels=1; {type(classifier).__name__}"
                             f" has num_labels={getattr(config, 'num_labels', None)}")
        trunk = getattr(classifier, "base_model", None)
        if not isinstance(score, nn.Linear) or score.out_features != 1 or trunk is None or trunk is classifier:
            raise ValueError(f"{type(classifier).__name__} does not read its score through a linear `score` layer on "
                             "a base model's last token (as GPT-2, Llama, Qwen2, Mistral ... classifiers do); "
                             "rlhf-gym cannot run it as a reward model")
        model = cls(trunk, offset=_reward_offset(config, "config"), backend=backend, tokenizer=tokenizer)
        with torch.no_grad():
            model.head.weight.copy_(score.weight.float())
            model.head.bias.copy_(score.bias.float() if score.bias is not None else torch.zeros(1))
        return model.to(next(trunk.parameters()).device)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device="cpu", dtype=None, trust_remote_code: bool = False,
                        backend: str = "auto"):
        """Load a reward model from a local folder holding a transformers sequence classifier with one label
        (``AutoModelForSequenceClassification``, safetensors only; `from_classifier`), in eval mode, with the
        folder's tokenizer if it holds one (``tokenizer.json`` or ``tokenizer_config.json``).

        `ValueError` for a folder without safetensors weights or ``config.json``, a config with ``num_labels`` other
        than 1, weights that do not match the config (`rlhf_env.models.check_loading_info`: a base model or a
        causal LM has no ``score`` weights), or a ``reward_offset`` that is not a finite number. A folder in the
        format of rlhf-gym 0.2 (``reward_head.safetensors`` + ``reward_config.json``) still loads; saving it
        again writes the standard format."""
        directory = Path(directory)
        check_safe_weights(directory)
        if (directory / LEGACY_HEAD_FILE).is_file():
            model = cls._from_legacy(directory, dtype, trust_remote_code, backend)
        else:
            if not (directory / "config.json").is_file():
                raise ValueError(f"{directory} has no config.json: not a saved model")
            with quiet_loading():
                config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code,
                                                    local_files_only=True)
            architectures = getattr(config, "architectures", None) or []
            if any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
                raise ValueError(f"{directory} holds a causal LM ({', '.join(architectures)}), not a reward model: a "
                                 "reward model is a sequence classifier with num_labels=1 (one scalar score)")
            if config.num_labels != 1:
                raise ValueError(f"{directory / 'config.json'}: num_labels={config.num_labels}, but a reward model is "
                                 "a sequence classifier with num_labels=1 (one scalar score)")
            _reward_offset(config, directory / "config.json")
            with quiet_loading():
                classifier, info = AutoModelForSequenceClassification.from_pretrained(
                    directory, config=config, use_safetensors=True, dtype=dtype, trust_remote_code=trust_remote_code,
                    output_loading_info=True, local_files_only=True)
            check_loading_info(directory, info)
            model = cls.from_classifier(classifier, backend=backend)
        if any((directory / name).is_file() for name in TOKENIZER_FILES):
            model.tokenizer = load_tokenizer(directory, trust_remote_code=trust_remote_code)
        return model.to(device).eval()

    @classmethod
    def _from_legacy(cls, directory: Path, dtype, trust_remote_code: bool, backend: str) -> RewardModel:
        """rlhf-gym 0.2's format: the trunk (``AutoModel``), ``reward_head.safetensors`` and the offset in
        ``reward_config.json``."""
        offset = _read_legacy_offset(directory / LEGACY_CONFIG_FILE)
        with quiet_loading():
            trunk, info = AutoModel.from_pretrained(directory, use_safetensors=True, dtype=dtype,
                                                    trust_remote_code=trust_remote_code, output_loading_info=True,
                                                    local_files_only=True)
        check_loading_info(directory, info, allowed_unexpected=("lm_head.",))
        model = cls(trunk, offset=offset, backend=backend)
        model.head.load_state_dict(load_file(directory / LEGACY_HEAD_FILE))
        return model


@torch.no_grad()
def _fold(trunk: nn.Module, head: nn.Linear, offset: torch.Tensor) -> bool:
    """`RewardModel.fold_offset` on the given trunk, head and offset buffer (in place)."""
    c = float(head.bias.double() - offset.double())
    norm, w = _foldable_norm(trunk), head.weight[0].double()
    squared = float(w @ w)
    if c != 0.0 and (norm is None or squared == 0.0):
        return False
    if c != 0.0:
        norm.bias.copy_((norm.bias.double() + c * w.to(norm.bias.device) / squared).to(norm.bias.dtype))
    head.bias.zero_()
    offset.zero_()
    return True


def _classifier_class(config) -> type:
    try:
        return AutoModelForSequenceClassification._model_mapping[type(config)]
    except KeyError:
        raise ValueError(f"transformers has no sequence classifier for {type(config).__name__}: this reward model "
                         "cannot be saved in the standard format") from None


def _foldable_norm(trunk: nn.Module) -> nn.LayerNorm | None:
    name = FOLDABLE_NORMS.get(getattr(trunk.config, "model_type", None))
    norm = getattr(trunk, name, None) if name else None
    if isinstance(norm, nn.LayerNorm) and norm.bias is not None:
        return norm
    return None


def _is_reward_model_dir(directory: Path) -> bool:
    if (directory / LEGACY_CONFIG_FILE).is_file():
        return True
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and OFFSET_FIELD in config


def _reward_offset(config, where) -> float:
    """``config.reward_offset`` (0 when absent), or `ValueError` naming `where` and the field."""
    offset = getattr(config, OFFSET_FIELD, 0.0)
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise ValueError(f"{where}: field {OFFSET_FIELD!r} must be a finite number, got {offset!r}")
    return float(offset)


def _read_legacy_offset(file: Path) -> float:
    """The ``"offset"`` of a ``reward_config.json``, or `ValueError` naming the file and the field."""
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{file} is not a readable JSON file: {error}") from error
    offset = config.get("offset") if isinstance(config, dict) else None
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise ValueError(f"{file}: field 'offset' must be a finite number, got {offset!r}")
    return float(offset)


# --- a reward model with its own tokenizer ------------------------------------------------------------------------


def same_tokenizer(a, b, probes: list[str] = ()) -> bool:
    """True when `a` and `b` tokenize alike: the same vocabulary, the same special tokens and ids, and the same ids
    (special tokens included) for each text of `probes`."""
    if a is b:
        return True
    if a.get_vocab() != b.get_vocab() or a.all_special_tokens != b.all_special_tokens:
        return False
    if any(getattr(a, f"{name}_token_id") != getattr(b, f"{name}_token_id") for name in ("bos", "eos", "pad", "unk")):
        return False
    return all(a(text)["input_ids"] == b(text)["input_ids"] for text in probes)


def encode_for_reward_model(tokenizer, texts: list[str], max_length: int | None, device="cpu"):
    """Right-padded ``ids (B, L)`` and ``attention_mask (B, L)`` of `texts` as `tokenizer` encodes them, special
    tokens included (``tokenizer(text)``: BOS where it adds one), in one batched call. A row longer than
    `max_length` loses tokens from the left, after its leading special tokens: the prompt's first tokens go first,
    so the whole response stays whenever it fits."""
    encoded = tokenizer(texts, add_special_tokens=True, return_special_tokens_mask=True)
    rows = []
    for ids, special in zip(encoded["input_ids"], encoded["special_tokens_mask"]):
        excess = len(ids) - max_length if max_length else 0
        if excess > 0:
            lead = next((i for i, s in enumerate(special) if not s), len(ids))
            ids = ids[:lead] + ids[lead + excess:]
        rows.append(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked either way
    return pad_right(rows, pad, device=device)
