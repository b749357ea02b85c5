"""Conversation prompts: rendered by the tokenizer's chat template with the generation prompt, episodes that end at
the template's end-of-turn token (or EOS), rewards that see the messages and the response text without markup, and
a named error, with nothing changed, for a conversation and a tokenizer without a template."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.error import ResetNeeded

from agents.evaluate import best_of_n
from rlhf_env.chat import NoChatTemplate, check_prompt, detect_end_of_turn
from rlhf_env.decoding.sampling import sample
from rlhf_env.env import RLHFEnv
from rlhf_env.models import build_policy
from rlhf_env.pipeline.tokenizer import train_tokenizer
from rlhf_env.tasks.base import Task
from rlhf_env.vector_env import RLHFVectorEnv

CHATML = ("{{ bos_token }}{% for m in messages %}"
          "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = "user assistant system say please hi bye yes no a b c d"


def chat_tokenizer(template: str | None = CHATML, special=("<|im_start|>", "<|im_end|>")):
    """A word-level tokenizer with the given added special tokens and chat template (None: no template)."""
    tokenizer = train_tokenizer([WORDS])
    tokenizer.add_tokens(list(special), special_tokens=True)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def conversation(word: str) -> list[dict]:
    return [{"role": "system", "content": "say yes"}, {"role": "user", "content": f"please say {word}"}]


class ChatTask(Task):
    """Conversations asking for a word; gold 1.0 for exactly that word."""

    name, max_new_tokens = "chat", 4

    def __init__(self, prompts=None):
        self.prompts = prompts or [conversation(w) for w in "a b c d hi bye".split()]
        self.gold_calls = []

    def train_prompts(self):
        return self.prompts[:-2]

    def eval_prompts(self):
        return self.prompts[-2:]

    def demonstrations(self, n, rng, split="train"):
        raise ValueError("no demonstrations")

    def gold(self, prompt, response):
        self.gold_calls.append((prompt, response))
        words = (prompt if isinstance(prompt, str) else prompt[-1]["content"]).split()
        return float(response == words[-1])


class Recording:
    """A batched reward function that records what it is given."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, responses):
        self.calls.append((prompts, responses))
        return [1.0] * len(prompts)


def make_env(tokenizer, task=None, vector=0, **kwargs):
    parts = dict(task=task or ChatTask(), tokenizer=tokenizer, policy=build_policy(tokenizer, seed=0),
                 reference=build_policy(tokenizer, seed=1), reward_fn=kwargs.pop("reward_fn", Recording()))
    if vector:
        return RLHFVectorEnv(num_envs=vector, **parts, **kwargs)
    return RLHFEnv(**parts, **kwargs)


def tokens(tokenizer, *names) -> list[int]:
    return tokenizer.convert_tokens_to_ids(list(names))


def test_a_conversation_is_rendered_by_the_chat_template_with_the_generation_prompt():
    tokenizer = chat_tokenizer()
    env = make_env(tokenizer)
    obs, info = env.reset(seed=0)
    prompt = info["prompt"]
    assert prompt in env.task.train_prompts()
    expected = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)["input_ids"]
    query = obs["input_ids"][obs["attention_mask"] == 1].tolist()
    assert query == expected and info["prompt_tokens"] == len(expected)
    assert tokenizer.convert_ids_to_tokens(query[:2] + query[-2:]) == ["<bos>", "<|im_start|>", "<|im_start|>",
                                                                        "assistant"]  # one BOS: the template's
    prompt[0]["content"] = "changed"  # the env hands out a copy: the task's conversation stays as it was
    assert all(p[0]["content"] == "say yes" for p in env.task.train_prompts())


def test_an_episode_ends_at_end_of_turn_and_rewards_get_the_messages_and_the_text():
    tokenizer = chat_tokenizer()
    reward = Recording()
    env = make_env(tokenizer, reward_fn=reward)
    world = env.unwrapped.world
    yes, im_end, eos = tokens(tokenizer, "yes", "<|im_end|>", "<eos>")
    assert world.stop_token_ids == (eos, im_end) and world.end_of_turn_id == im_end
    _, info = env.reset(seed=0)
    _, _, terminated, _, _ = env.step(yes)
    assert not terminated
    _, _, terminated, _, end = env.step(im_end)
    assert terminated and end["finished"] and end["length"] == 2
    assert end["response_text"] == "yes"  # no <|im_end|>, no role markup
    assert reward.calls == [([info["prompt"]], ["yes"])]
    assert env.task.gold_calls == [(info["prompt"], "yes")]
    with pytest.raises(ResetNeeded):
        env.step(yes)
    env.reset(seed=0)
    _, _, terminated, _, end = env.step(eos)  # EOS ends a turn too
    assert terminated and end["finished"] and end["response_text"] == ""
    env.reset(seed=0)
    for _ in range(env.task.max_new_tokens):
        _, _, terminated, _, end = env.step(yes)
    assert terminated and not end["finished"]  # the cap is not the end of a turn


@pytest.mark.parametrize("template, special, expected", [
    (CHATML, ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|> {{ m['content'] }}<|eot_id|>"
     "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|> {% endif %}",
     ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>"),  # Llama 3's form
    ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% if m['role'] == 'assistant' %}bye ! "
     "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}assistant {% endif %}", (), "<eos>"),
    # a turn ends at EOS, after words (one unknown: <unk> is special, but no end of turn)
    ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}"
     "assistant {% endif %}", (), None),  # nothing marks the end of a turn: episodes end at EOS only
    ("{{ raise_exception('only user messages') }}", (), None),
])
def test_the_end_of_turn_token_is_read_off_the_template(template, special, expected):
    tokenizer = chat_tokenizer(template, special)
    found = detect_end_of_turn(tokenizer)
    assert (None if found is None else tokenizer.convert_ids_to_tokens(found)) == expected


def test_end_of_turn_can_be_named_and_a_bad_one_is_refused():
    tokenizer = chat_tokenizer()
    yes, im_end, eos = tokens(tokenizer, "yes", "<|im_end|>", "<eos>")
    text_task = ChatTask([f"please say {w}" for w in "a b c d".split()])
    assert make_env(tokenizer, text_task).unwrapped.world.stop_token_ids == (eos,)  # plain prompts: EOS only
    env = make_env(tokenizer, text_task, end_of_turn="<|im_end|>")
    assert env.unwrapped.world.stop_token_ids == (eos, im_end)
    env.reset(seed=0)
    _, _, terminated, _, end = env.step(im_end)
    assert terminated and end["finished"]
    assert make_env(tokenizer, end_of_turn=yes).unwrapped.world.end_of_turn_id == yes  # overrides the template's
    for bad, message in [("<|nope|>", "not a token"), (10**6, "outside"), (-1, "outside"), (True, "must be"),
                         (2.0, "must be")]:
        with pytest.raises(ValueError, match=message):
            make_env(tokenizer, end_of_turn=bad)


def test_a_conversation_without_a_chat_template_is_refused_before_any_model_runs():
    tokenizer = chat_tokenizer(template=None)
    policy = build_policy(tokenizer, seed=0)

    def no_forward(*args):
        raise AssertionError("a model ran")

    policy.register_forward_pre_hook(no_forward)
    with pytest.raises(NoChatTemplate, match="a prompt of task 'chat' is a conversation, but the tokenizer .* has "
                                             "no chat template"):
        RLHFEnv(task=ChatTask(), tokenizer=tokenizer, policy=policy, reference=build_policy(tokenizer, seed=1),
                reward_fn=Recording(), backend="hf")
    assert issubclass(NoChatTemplate, ValueError)


LONG_TEXT_PROMPTS = [f"please say {w} a b c d yes no hi bye a b c d" for w in "a b c d".split()]  # 16 tokens


def test_a_pinned_conversation_without_a_template_changes_nothing():
    tokenizer = chat_tokenizer(template=None)
    env = make_env(tokenizer, ChatTask(LONG_TEXT_PROMPTS))
    env.reset(seed=0)
    env.step(tokens(tokenizer, "yes")[0])
    obs, state = env.unwrapped._observation(), env.np_random.bit_generator.state
    with pytest.raises(NoChatTemplate, match="reset option 'prompt' is a conversation"):
        env.reset(options={"prompt": conversation("a")})
    with pytest.raises(ValueError, match="message 0: 'content' must be a string"):
        env.reset(options={"prompt": [{"role": "user", "content": None}]})
    assert all((env.unwrapped._observation()[k] == obs[k]).all() for k in obs)
    assert env.np_random.bit_generator.state == state
    _, _, terminated, _, _ = env.step(tokenizer.eos_token_id)  # the episode goes on
    assert terminated
    chat = make_env(chat_tokenizer(), ChatTask(LONG_TEXT_PROMPTS))
    obs, info = chat.reset(options={"prompt": conversation("a")})  # with a template a pinned one is rendered
    assert info["prompt"] == conversation("a")
    assert (obs["input_ids"][obs["attention_mask"] == 1].tolist()
            == chat.tokenizer.apply_chat_template(conversation("a"), add_generation_prompt=True)["input_ids"])


def test_the_vector_env_keeps_each_conversation_whole():
    tokenizer = chat_tokenizer()
    reward = Recording()
    envs = make_env(tokenizer, vector=3, reward_fn=reward)
    pinned = [conversation("a"), conversation("b"), conversation("a")]  # lists of equal length
    _, infos = envs.reset(seed=0, options={"prompts": pinned})
    assert infos["prompt"].shape == (3,) and list(infos["prompt"]) == pinned
    yes, im_end = tokens(tokenizer, "yes", "<|im_end|>")
    envs.step(np.array([yes, yes, im_end]))
    _, _, terminated, _, infos = envs.step(np.array([im_end, yes, yes]))
    assert terminated.tolist() == [True, False, False]
    assert infos["response_text"][0] == "yes" and reward.calls[0] == ([pinned[2]], [""])
    assert reward.calls[1] == ([pinned[0]], ["yes"])


def test_sampling_stops_at_any_stop_token_and_best_of_n_scores_text_without_markup():
    tokenizer = chat_tokenizer()
    policy = build_policy(tokenizer, seed=0).eval()
    query = tokenizer.apply_chat_template(conversation("a"), add_generation_prompt=True)["input_ids"]
    every = tuple(range(len(tokenizer)))  # every token stops: one token each
    samples = sample(policy, [query] * 4, backend="gpt2", max_new_tokens=5, eos_token_id=every,
                     pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    assert samples.finished.all() and samples.response_mask.sum(1).tolist() == [1, 1, 1, 1]
    reward = Recording()
    envs = make_env(tokenizer, vector=2, reward_fn=reward, max_new_tokens=8)
    best_of_n(envs, n=4, n_episodes=8, seed=0)
    texts = [text for _, responses in reward.calls for text in responses]
    assert len(texts) == 32 and not any("<|im_end|>" in t or "<|im_start|>" in t for t in texts)
    prompts = [p for prompts, _ in reward.calls for p in prompts]
    assert all(p in envs.task.eval_prompts() for p in prompts)


@pytest.mark.parametrize("prompt, message", [
    ("  ", "blank"), ([], "no messages"), ([{"role": "user"}], "'content' must be a string"),
    ([{"role": "", "content": "x"}], "'role' must be a non-empty string"), (["hi"], "message 0: expected a dict"),
    ([{"role": "user", "content": " "}], "every message of the conversation is blank"),
    ({"role": "user", "content": "x"}, "got dict"), (None, "got NoneType"),
])
def test_a_malformed_prompt_is_named(prompt, message):
    with pytest.raises(ValueError, match=message):
        check_prompt(prompt, "here")


def test_none_valued_message_keys_are_dropped():
    assert check_prompt([{"role": "user", "content": "x", "name": None}], "here") == [{"role": "user",
                                                                                       "content": "x"}]


def test_gym_make_takes_a_chat_task():
    tokenizer = chat_tokenizer()
    env = gym.make("RLHF-v0", task=ChatTask(), tokenizer=tokenizer, policy=build_policy(tokenizer, seed=0),
                   reference=build_policy(tokenizer, seed=1), reward_fn=Recording())
    _, info = env.reset(seed=1)
    assert isinstance(info["prompt"], list)
