"""RLOO with LoRA on your own chat model, scored by your own reward model and a rule, prompts from a JSONL file.

The whole stack a user brings, end to end:

* the policy: a local Llama-architecture causal LM whose tokenizer has a chat template (a ``save_pretrained`` folder);
* a reward model in the standard format, an ``AutoModelForSequenceClassification`` with ``num_labels=1``, saved with
  its OWN tokenizer (another vocabulary: the env decodes each episode and re-encodes the text for it);
* the prompts: a JSON Lines file of conversations, one ``{"messages": [...]}`` per line, read through `datasets`
  (`rlhf_env.tasks.DatasetTask`) and rendered with the chat template; episodes end at its end-of-turn token;
* two rewards, the reward model and a batched rule, weighted (``rewards=``, ``reward_weights=``);
* LoRA: only the adapters train, and π_ref is the same base with the adapters off (``lora=LoraConfig(...)``);
* REINFORCE with the RLOO baseline for a few updates, a held-out evaluation before and after (each reward's score,
  the KL), and an adapters-only checkpoint that PEFT reads as it is.

The stand-ins for your files are built in a temporary folder by `make_stand_ins`: tiny random models, so the
numbers mean nothing but that the pipe works. Replace each path it returns by your own.

Needs the ``lora`` and ``datasets`` extras (both part of ``dev``):

    pip install -e ".[lora,datasets]"
    python examples/own_stack.py --updates 30 --out runs/own_stack
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import torch
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
from transformers.utils import logging as transformers_logging

import rlhf_env  # noqa: F401  (registers RLHF-v0)
from agents.evaluate import evaluate
from agents.reinforce import Reinforce, ReinforceConfig
from rlhf_env.pipeline.tokenizer import train_tokenizer
from rlhf_env.tasks import DatasetTask

# A ChatML template, as Qwen's; a Llama 3 template (<|eot_id|>) works the same way.
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QUESTIONS = ["name a colour", "name an animal", "name a fruit", "name a city", "say hello", "say thanks",
             "pick a number", "describe the sky", "describe the sea", "describe a cat", "describe a dog", "greet me"]
STYLES = ["answer in one word .", "be brief .", "be polite ."]
ANSWERS = "red blue green cat dog apple pear paris rome one two three hello thanks please the sky sea is calm grey"


def make_stand_ins(folder: Path) -> tuple[Path, Path, Path]:
    """Your policy folder, your reward-model folder and your prompt file, as a user would have them."""
    transformers_logging.disable_progress_bar()  # no "Writing model shards" bars while the stand-ins are saved
    conversations = [[{"role": "system", "content": style}, {"role": "user", "content": question}]
                     for style in STYLES for question in QUESTIONS]
    corpus = [m["content"] for c in conversations for m in c] + [ANSWERS, "system user assistant"]

    # The policy: a tokenizer with a chat template and a tiny Llama. Replace with your own path.
    tokenizer = train_tokenizer(corpus)  # word-level; yours is whatever your model ships with
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **ids)
                     ).save_pretrained(folder / "policy")
    tokenizer.save_pretrained(folder / "policy")

    # The reward model: a sequence classifier with one label and its OWN tokenizer (byte-level BPE, another
    # vocabulary) saved in its folder. Replace with your own path.
    rm_tokenizer = train_tokenizer(corpus * 4, kind="bpe", vocab_size=300)
    torch.manual_seed(1)
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(rm_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, num_labels=1, pad_token_id=rm_tokenizer.pad_token_id,
        bos_token_id=rm_tokenizer.bos_token_id, eos_token_id=rm_tokenizer.eos_token_id)
    ).save_pretrained(folder / "reward_model")
    rm_tokenizer.save_pretrained(folder / "reward_model")

    # The prompts: one conversation per line. Replace with your own path.
    with open(folder / "prompts.jsonl", "w") as file:
        for messages in conversations:
            file.write(json.dumps({"messages": messages}) + "\n")
    transformers_logging.enable_progress_bar()
    return folder / "policy", folder / "reward_model", folder / "prompts.jsonl"


def concise(prompts: list, responses: list[str], finished: list[bool]) -> list[float]:
    """A rule, batched: 1 for an answer that closes its turn within 4 words, else 0. `prompts` are the messages,
    `responses` the text without markup, `finished` whether each ended at the end-of-turn token (or EOS)."""
    return [float(done and len(response.split()) <= 4) for response, done in zip(responses, finished)]


def report(label: str, stats: dict, weights: dict[str, float]) -> None:
    """The paid score (the weighted sum), each reward's own score, the sequence KL to π_ref and the lengths."""
    parts = " + ".join(f"{w:g} x {name} {stats[f'objective/score/{name}']:+.3f}" for name, w in weights.items())
    print(f"{label:<7} score {stats['objective/score']:+.3f} = {parts}   KL {stats['objective/kl']:.3f} nats   "
          f"length {stats['episode/length']:.1f}   ended its turn {stats['episode/eos_rate']:.0%}")


def main(updates: int = 30, eval_episodes: int = 128, out: str | Path = "runs/own_stack", seed: int = 0) -> dict:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        policy, reward_model, prompts = make_stand_ins(Path(tmp))

        task = DatasetTask(prompts, prompt_column="messages", eval_fraction=0.25, max_new_tokens=12, seed=seed)
        envs = gym.make_vec(
            "RLHF-v0", num_envs=16, task=task, policy=policy, tokenizer=policy,  # π_ref: the base, adapters off
            lora=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
            rewards={"rm": reward_model, "concise": concise}, reward_weights={"rm": 1.0, "concise": 0.5}, beta=0.05)
        world, weights = envs.unwrapped.world, envs.unwrapped.reward_weights
        print(f"prompts: {len(task.train_prompts())} train, {len(task.eval_prompts())} held out; episodes end at "
              f"{world.tokenizer.convert_ids_to_tokens(world.stop_token_ids)}")
        trained = sum(p.numel() for p in world.policy.parameters() if p.requires_grad)
        print(f"policy: {type(world.policy.get_base_model()).__name__} + LoRA, {trained:,} of "
              f"{sum(p.numel() for p in world.policy.parameters()):,} parameters train; π_ref: the base "
              f"({type(world.reference).__name__})")
        rm_tokenizer = next(source.tokenizer for source in world.reward_sources if source.name == "rm")
        print("reward model 'rm' reads " + ("the policy's token ids" if rm_tokenizer is None else
              f"the text with its own tokenizer ({len(rm_tokenizer)} tokens; the policy's has {len(world.tokenizer)})"))

        agent = Reinforce(envs, ReinforceConfig(baseline="rloo", samples_per_prompt=4, episodes_per_update=32,
                                                learning_rate=2e-3, seed=seed), progress=False)
        before = evaluate(envs, eval_episodes)  # held-out prompts, sampled from the policy
        report("before", before, weights)
        for update in range(1, updates + 1):
            metrics = agent.update()
            if update == 1 or update % 10 == 0 or update == updates:
                print(f"update {update:3d}  train score {metrics['objective/score']:+.3f}  "
                      f"KL {metrics['objective/kl']:.3f}")
        after = evaluate(envs, eval_episodes)
        report("after", after, weights)

        # The checkpoint holds the adapters only (policy/: what PeftModel.save_pretrained writes) next to the agent's
        # state. Reinforce.load(checkpoint, envs) resumes training; your trained model is your base + the adapters:
        #     PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("path/to/policy"), checkpoint / "policy")
        checkpoint = Path(out) / "checkpoint"
        agent.save(checkpoint)
        adapters = sum(f.stat().st_size for f in (checkpoint / "policy").iterdir())
        base = (policy / "model.safetensors").stat().st_size
        print(f"adapters-only checkpoint: {checkpoint / 'policy'} ({adapters / 1024:.0f} KiB; the base is "
              f"{base / 1024:.0f} KiB)")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return {"before": before, "after": after, "checkpoint": checkpoint}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=30, help="RLOO updates (32 episodes each)")
    parser.add_argument("--eval-episodes", type=int, default=128, help="held-out episodes before and after")
    parser.add_argument("--out", default="runs/own_stack", help="where the checkpoint goes")
    args = parser.parse_args()
    main(args.updates, args.eval_episodes, args.out)
