"""Faults (issue 19, "nothing lost, nothing half-done"): a failing callback leaves the env exactly as it was and the
retried step gives what an unfailed one gives; a failing commit needs a reset; values from user code are checked;
bad arguments and incompatible parts are refused at the door; tokenizers load from local folders only."""

import copy
import io
import json
import math
import shutil
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.error import ResetNeeded
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

import rlhf_env  # noqa: F401  (registers RLHF-v0)
from rlhf_env.assets import asset_dir
from rlhf_env.env import RLHFEnv
from rlhf_env.models import load_causal_lm, load_tokenizer
from rlhf_env.reward import NonFiniteReward, real_score
from rlhf_env.reward_model import RewardModel

HONEST = object()


class Switch:
    """A reward function whose next value (or failure) the test sets: ``mode`` `HONEST` (a score from the
    response's length), "raise", "nan", or any other object (returned as is)."""

    def __init__(self):
        self.mode = HONEST

    def __call__(self, prompts, responses):  # batched: one value per response
        return [self.one(response) for response in responses]

    def one(self, response):
        if self.mode is HONEST:
            return 0.25 * len(response) - 1.0
        if isinstance(self.mode, str) and self.mode == "raise":
            raise RuntimeError("reward service down")
        if isinstance(self.mode, str) and self.mode == "nan":
            return float("nan")
        return self.mode


def same(a, b) -> bool:
    """Bit-identical, through dicts, numpy arrays (object arrays too) and floats (NaN equal to NaN)."""
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        if not isinstance(b, np.ndarray) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype == object:
            return all(same(x, y) for x, y in zip(a.ravel(), b.ravel()))
        return a.tobytes() == b.tobytes()
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


@pytest.fixture(scope="module")
def default_env():
    return RLHFEnv()


@pytest.fixture(scope="module")
def tokens(default_env):
    """``(eos, words)``: the EOS id and a few ordinary token ids."""
    tok = default_env.tokenizer
    special = set(tok.all_special_ids)
    return tok.eos_token_id, [t for t in range(len(tok)) if t not in special][5:9]


# --- A. Transactional steps ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["NextStep", "SameStep"])
def vector_pair(request):
    """Two identical 4-row vector envs with their own `Switch` reward functions: one to fail, one twin."""
    pair = []
    for _ in range(2):
        fn = Switch()
        pair.append((gym.make_vec("RLHF-v0", num_envs=4, reward_fn=fn, autoreset_mode=request.param), fn))
    return pair


def vector_actions(eos, words):
    """Per step: row 1 ends at step 1 (so it autoresets during step 2), row 0 ends at step 2, rows 2-3 go on."""
    w = words
    return [np.array([w[0], w[1], w[2], w[3]]), np.array([w[1], eos, w[0], w[1]]),
            np.array([eos, w[2], w[3], w[0]]), np.array([w[2], w[3], w[1], eos]),
            np.array([w[0], w[0], w[0], w[0]])]


@pytest.mark.parametrize("fault", ["raise", "nan", "1.5"])
def test_vector_step_whose_reward_fails_changes_nothing_and_its_retry_matches_a_twin(vector_pair, tokens, fault):
    (envs, fn), (twin, twin_fn) = vector_pair
    fn.mode = twin_fn.mode = HONEST
    eos, words = tokens
    actions = vector_actions(eos, words)
    assert same(envs.reset(seed=0), twin.reset(seed=0))
    for a in actions[:2]:
        assert same(envs.step(a), twin.step(a))
    before = (envs.unwrapped._observations(), envs.unwrapped.next_token_logprobs,
              [rng.bit_generator.state for rng in envs.unwrapped._rngs], envs.unwrapped.queries())
    fn.mode = fault
    with pytest.raises((RuntimeError, NonFiniteReward, TypeError)):
        envs.step(actions[2])  # row 0 emits EOS: the reward is asked for and fails
    after = (envs.unwrapped._observations(), envs.unwrapped.next_token_logprobs,
             [rng.bit_generator.state for rng in envs.unwrapped._rngs], envs.unwrapped.queries())
    assert same(before[0], after[0]) and same(before[1], after[1])
    assert before[2] == after[2] and before[3] == after[3]  # no autoreset row was started, no generator drew
    fn.mode = HONEST
    for a in actions[2:]:
        assert same(envs.step(a), twin.step(a))  # the retry, and every step after it, as if nothing had failed
    assert same(envs.unwrapped.next_token_logprobs, twin.unwrapped.next_token_logprobs)


@pytest.mark.parametrize("fault", ["raise", "nan", "string"])
def test_single_env_step_whose_reward_fails_can_be_retried_and_matches_a_twin(tokens, fault):
    fn, twin_fn = Switch(), Switch()
    env, twin = RLHFEnv(reward_fn=fn), RLHFEnv(reward_fn=twin_fn)
    eos, words = tokens
    assert same(env.reset(seed=3), twin.reset(seed=3))
    assert same(env.step(words[0]), twin.step(words[0]))
    fn.mode = {"raise": "raise", "nan": "nan", "string": "1.5"}[fault]
    with pytest.raises((RuntimeError, NonFiniteReward, TypeError)):
        env.step(eos)
    fn.mode = HONEST
    assert same(env.step(eos), twin.step(eos))  # the episode was not consumed by the failed step
    assert same(env.reset(), twin.reset())


def test_failing_reward_model_and_task_gold_change_nothing(default_env, tokens, monkeypatch):
    env = default_env
    eos, words = tokens
    env.reset(seed=1)
    env.step(words[0])
    obs, logp = env.unwrapped._observation(), env.unwrapped.next_token_logprobs
    world = env.unwrapped.world

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    with monkeypatch.context() as m:
        m.setattr(world.reward_model, "score", broken)
        with pytest.raises(RuntimeError, match="out of memory"):
            env.step(eos)
    with monkeypatch.context() as m:
        m.setattr(world.task, "gold", broken)
        with pytest.raises(RuntimeError, match="out of memory"):
            env.step(eos)
    assert same(env.unwrapped._observation(), obs) and same(env.unwrapped.next_token_logprobs, logp)
    _, _, terminated, _, info = env.step(eos)
    assert terminated and info["length"] == 2


def test_an_adaptive_beta_records_no_kl_of_a_failed_step(tokens):
    eos, words = tokens
    envs = []
    for _ in range(2):
        fn = Switch()
        envs.append((gym.make_vec("RLHF-v0", num_envs=2, reward_fn=fn, kl_target=0.5, kl_horizon=10,
                                  kl_batch_episodes=1, beta=0.1), fn))
    (env, fn), (twin, _) = envs
    for e in (env, twin):
        e.reset(seed=0)
        e.step(np.array([words[0], words[1]]))
    fn.mode = "raise"
    with pytest.raises(RuntimeError):
        env.step(np.array([eos, words[2]]))
    assert env.unwrapped.beta == 0.1 and env.unwrapped.world._kl_batch == []
    fn.mode = HONEST
    for a in (np.array([eos, words[2]]), np.array([words[3], eos])):
        assert same(env.step(a), twin.step(a))
    assert env.unwrapped.beta == twin.unwrapped.beta != 0.1


def test_an_agent_whose_log_probs_overflow_float32_is_refused_before_the_step(tokens):
    eos, words = tokens

    class Agent:
        value = -1e300  # finite in float64, −inf in float32: its KL and reward would reach the agent as inf

        def action_logprobs(self, observations, actions):
            return np.full(len(actions), self.value)

    env = RLHFEnv(kl_mode="agent")
    agent = Agent()
    env.attach_agent(agent)
    obs, _ = env.reset(seed=0)
    with pytest.raises(NonFiniteReward, match="float32"):
        env.step(words[0])
    assert same(env.unwrapped._observation(), obs)
    agent.value = -2.0
    _, reward, _, _, info = env.step(words[0])
    assert info["logprob"] == -2.0 and np.isfinite(reward)


@pytest.mark.parametrize("vector", [False, True])
def test_a_step_that_fails_while_committing_needs_a_reset(default_env, tokens, vector, monkeypatch):
    eos, words = tokens
    env = gym.make_vec("RLHF-v0", num_envs=2) if vector else default_env
    env.reset(seed=0)
    action = np.array(words[:2]) if vector else words[0]
    episodes = env.unwrapped._episodes
    with monkeypatch.context() as m:
        m.setattr(episodes, "feed", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA out of memory")))
        with pytest.raises(RuntimeError, match="CUDA out of memory"):
            env.step(action)
    with pytest.raises(ResetNeeded, match="CUDA out of memory"):
        env.step(action)
    with pytest.raises(ResetNeeded, match="CUDA out of memory"):
        _ = env.unwrapped.next_token_logprobs
    env.reset(seed=0)  # a reset clears it
    env.step(action)


# --- B. Values crossing from user code -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def switch_env():
    fn = Switch()
    return RLHFEnv(reward_fn=fn), fn


@pytest.mark.parametrize("value", ["1.5", None, 1 + 2j, [1.0], np.array([1.0, 2.0]), True, np.bool_(False),
                                   torch.tensor([0.5]), object()],
                         ids=["str", "None", "complex", "list", "array", "bool", "np-bool", "tensor-1d", "object"])
def test_a_reward_fn_value_that_is_not_a_real_number_is_a_type_error_naming_it(switch_env, tokens, value):
    env, fn = switch_env
    eos, _ = tokens
    fn.mode = value
    try:
        obs, _ = env.reset(seed=0, options={"prompt": "the movie was"})
        with pytest.raises(TypeError, match=r"reward_fn Switch.*prompt 'the movie was'") as raised:
            env.step(eos)
        assert type(value).__name__ in str(raised.value)
        assert same(env.unwrapped._observation(), obs)  # the episode goes on
    finally:
        fn.mode = HONEST


@pytest.mark.parametrize("value", [2, 0.5, np.float32(0.5), np.int64(2), np.array(0.5), torch.tensor(0.5),
                                   torch.tensor(2)])
def test_a_reward_fn_may_return_any_real_number(switch_env, tokens, value):
    env, fn = switch_env
    fn.mode = value
    try:
        env.reset(seed=0)
        _, reward, _, _, info = env.step(tokens[0])
    finally:
        fn.mode = HONEST
    assert info["score"] == float(value) and isinstance(info["score"], float)


def test_task_gold_must_return_a_real_number(default_env, tokens, monkeypatch):
    env = default_env
    env.reset(seed=0)
    monkeypatch.setattr(env.unwrapped.world.task, "gold", lambda prompt, response: "good")
    with pytest.raises(TypeError, match="task.gold"):
        env.step(tokens[0])


def test_a_score_beyond_float32_is_non_finite(tokens):
    fn = Switch()
    fn.mode = 1e39
    env = RLHFEnv(reward_fn=fn)
    env.reset(seed=0)
    with pytest.raises(NonFiniteReward):
        env.step(tokens[0])
    masked = RLHFEnv(reward_fn=fn, nonfinite_reward="mask")
    masked.reset(seed=0)
    _, reward, _, _, info = masked.step(tokens[0])
    assert info["score"] == 0.0 and info["score_nonfinite"] and np.isfinite(np.float32(reward))
    assert real_score(np.array(1.5, dtype=np.float32), "f", "p") == 1.5


# --- C. Arguments validated at the door ------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature=0), dict(temperature=-1),
    dict(missing_eos_penalty=float("nan")), dict(missing_eos_penalty=float("inf")), dict(missing_eos_penalty=1e39),
    dict(max_new_tokens=0), dict(max_new_tokens=2.5), dict(max_new_tokens=-1), dict(max_new_tokens=10**6),
    dict(kl_horizon=0.5), dict(kl_horizon=0), dict(kl_target=float("inf")), dict(kl_target=float("nan")),
    dict(kl_target=-1.0), dict(beta=float("nan")), dict(beta=float("inf")), dict(beta=-0.1),
    dict(trust_remote_code="yes"), dict(beta="0.1"), dict(temperature="1"), dict(dtype="bogus"),
    dict(device="cuda:0"), dict(device="nonsense"), dict(compact_at=-3), dict(compact_at=2.5),
], ids=lambda kwargs: f"{next(iter(kwargs))}={next(iter(kwargs.values()))}")
def test_bad_arguments_are_refused_when_the_env_is_built(kwargs):
    name = next(iter(kwargs))
    if name == "device" and torch.cuda.is_available() and kwargs["device"] == "cuda:0":
        pytest.skip("a CUDA device exists")
    with pytest.raises(ValueError, match=name if name not in ("beta", "kl_target") else "beta|target"):
        RLHFEnv(**kwargs)


@pytest.mark.parametrize("num_envs", [True, 0, 2.5, "4"])
def test_bad_row_counts_are_named(num_envs):
    with pytest.raises(ValueError, match="num_envs"):
        gym.make_vec("RLHF-v0", num_envs=num_envs)


def test_numpy_integers_are_integers():
    envs = gym.make_vec("RLHF-v0", num_envs=np.int64(2), max_new_tokens=np.int64(4), kl_horizon=np.int32(100))
    assert envs.num_envs == 2 and envs.unwrapped.world.max_new_tokens == 4


@pytest.mark.parametrize("seed, error", [(2.5, TypeError), ("x", TypeError), (True, TypeError), (-1, ValueError)])
def test_bad_seeds_and_options_are_refused_and_change_nothing(default_env, tokens, seed, error):
    env = default_env
    obs, _ = env.reset(seed=0)
    env.step(tokens[1][0])
    obs = env.unwrapped._observation()
    state = env.np_random.bit_generator.state
    with pytest.raises(error, match="seed"):
        env.reset(seed=seed)
    with pytest.raises(ValueError, match="options"):
        env.reset(options="abc")
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(seed=5, options={"nope": 1})  # the seed is not applied either
    assert same(env.unwrapped._observation(), obs) and env.np_random.bit_generator.state == state
    envs = gym.make_vec("RLHF-v0", num_envs=2) if seed == 2.5 else None
    if envs is not None:
        with pytest.raises(TypeError, match="seed"):
            envs.reset(seed=[0, 2.5])
        with pytest.raises(ValueError, match="options"):
            envs.reset(options="abc")


def test_numpy_integer_seeds_and_seed_lists_are_accepted(default_env):
    assert same(default_env.reset(seed=np.int64(7)), default_env.reset(seed=7))
    envs = gym.make_vec("RLHF-v0", num_envs=2)
    first = envs.reset(seed=[np.int64(4), None])
    assert first[1]["prompt"][0] == envs.reset(seed=[4, 9])[1]["prompt"][0]


def test_next_token_logprobs_and_render_before_any_reset():
    env = RLHFEnv(render_mode="ansi")
    with pytest.raises(ResetNeeded):
        _ = env.next_token_logprobs
    assert "reset" in env.render()
    envs = gym.make_vec("RLHF-v0", num_envs=2, render_mode="ansi")
    with pytest.raises(ResetNeeded):
        _ = envs.unwrapped.next_token_logprobs
    assert "reset" in envs.render()


# --- D. Incompatible parts caught at construction --------------------------------------------------------------


def test_a_reward_model_with_a_smaller_vocabulary_is_refused(default_env):
    vocab = default_env.unwrapped.world.vocab_size
    trunk = GPT2Model(GPT2Config(vocab_size=vocab - 10, n_positions=64, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="reward model's vocabulary"):
        RLHFEnv(reward_model=RewardModel(trunk))


@pytest.mark.parametrize("part", ["reward_model", "policy"])
def test_a_model_with_a_shorter_context_is_refused(default_env, part):
    vocab = default_env.unwrapped.world.vocab_size
    config = GPT2Config(vocab_size=vocab, n_positions=12, n_embd=32, n_layer=1, n_head=2)
    model = RewardModel(GPT2Model(config)) if part == "reward_model" else GPT2LMHeadModel(config)
    with pytest.raises(ValueError, match="context|allows"):
        RLHFEnv(**{part: model})


@pytest.mark.parametrize("layers", [1, 3])
def test_a_config_that_does_not_match_the_weights_is_refused(tmp_path, layers):
    for name in ("policy", "reward_model"):
        folder = tmp_path / name
        shutil.copytree(asset_dir("sentiment") / name, folder)
        config = json.loads((folder / "config.json").read_text())
        config["n_layer"] = layers  # the weights hold 2 layers
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="do not match config.json"):
            load_causal_lm(folder) if name == "policy" else RewardModel.from_pretrained(folder)


def test_normal_checkpoints_of_gpt2_llama_and_qwen2_load(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = dict(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=50)
    for i, model in enumerate([GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50,
                                                          bos_token_id=0, eos_token_id=0)),
                               LlamaForCausalLM(LlamaConfig(**small)),
                               LlamaForCausalLM(LlamaConfig(**small, tie_word_embeddings=True)),
                               Qwen2ForCausalLM(Qwen2Config(**small))]):
        model.save_pretrained(tmp_path / str(i))
        loaded = load_causal_lm(tmp_path / str(i))
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_a_tokenizer_without_a_pad_token_pads_with_eos_and_is_not_changed(default_env, tokens):
    tokenizer = copy.deepcopy(default_env.tokenizer)
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    envs = gym.make_vec("RLHF-v0", num_envs=2, tokenizer=tokenizer)
    assert tokenizer.pad_token_id is None and envs.unwrapped.world.pad_token_id == tokenizer.eos_token_id
    eos, words = tokens
    envs.reset(seed=0)
    for a in ([words[0], eos], [eos, words[1]], [words[2], words[3]]):
        _, rewards, _, _, _ = envs.step(np.array(a))
        assert np.isfinite(rewards).all()


def test_a_tokenizer_without_eos_is_refused(default_env):
    tokenizer = copy.deepcopy(default_env.tokenizer)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="EOS"):
        RLHFEnv(tokenizer=tokenizer)


@pytest.mark.parametrize("content", ["{}", '{"scale": 1}', '{"offset": "0.5"}', '{"offset": null}', "[1]", "nope"])
def test_a_bad_reward_config_names_the_file_and_the_field(tmp_path, content):
    # The format of rlhf-gym 0.2, which still loads: trunk + reward_head.safetensors + reward_config.json.
    folder = tmp_path / "rm"
    model = RewardModel.from_pretrained(asset_dir("sentiment") / "reward_model")
    model.trunk.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, folder / "reward_head.safetensors")
    (folder / "reward_config.json").write_text(content)
    with pytest.raises(ValueError, match="reward_config.json") as raised:
        RewardModel.from_pretrained(folder)
    assert "offset" in str(raised.value) or content == "nope"


@pytest.mark.parametrize("offset", ["0.5", None, [1], True, float("nan")])
def test_a_bad_reward_offset_names_the_file_and_the_field(tmp_path, offset):
    folder = tmp_path / "rm"
    shutil.copytree(asset_dir("sentiment") / "reward_model", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, reward_offset=offset)))
    with pytest.raises(ValueError, match="config.json.*reward_offset"):
        RewardModel.from_pretrained(folder)


# --- E. Tokenizers load from local folders only ----------------------------------------------------------------


@pytest.mark.parametrize("path", ["gpt2", "openai-community/gpt2", "/no/such/folder"])
def test_a_tokenizer_that_is_not_a_local_folder_is_refused_without_the_network(path):
    start = time.monotonic()
    with pytest.raises(ValueError, match="local folders only"):
        load_tokenizer(path)
    with pytest.raises(ValueError, match="local folders only"):
        RLHFEnv(tokenizer=path)
    assert time.monotonic() - start < 10


def test_a_tokenizer_folder_with_code_is_refused_without_asking_or_running_it(tmp_path, monkeypatch):
    folder = tmp_path / "tokenizer"
    shutil.copytree(asset_dir("sentiment") / "tokenizer", folder)
    marker = tmp_path / "executed"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\n"))  # were the user asked, "yes" would run the code
    with pytest.raises(ValueError, match="auto_map"):
        load_tokenizer(folder)
    with pytest.raises(ValueError, match="auto_map"):
        RLHFEnv(tokenizer=str(folder))
    assert not marker.exists()
