import pytest
import torch

from rlhf_env.models import build_policy, count_parameters, load_causal_lm


def test_presets_have_the_documented_sizes(tokenizer):
    assert 0.35e6 < count_parameters(build_policy(tokenizer, "tiny")) < 0.5e6
    assert 1.8e6 < count_parameters(build_policy(tokenizer, "small")) < 3e6
    with pytest.raises(ValueError, match="unknown model preset"):
        build_policy(tokenizer, "huge")


def test_saved_then_loaded_model_gives_identical_outputs(policy, tmp_path):
    policy.save_pretrained(tmp_path)
    loaded = load_causal_lm(tmp_path)
    ids = torch.tensor([[1, 5, 9, 12, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, policy(input_ids=ids).logits)
    assert not loaded.training


def test_pickle_only_directory_is_refused(policy, tmp_path):
    policy.config.save_pretrained(tmp_path)
    torch.save(policy.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        load_causal_lm(tmp_path)


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a local directory"):
        load_causal_lm(tmp_path / "nope")
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_causal_lm(tmp_path)
