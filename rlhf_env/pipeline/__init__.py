"""Making the world: the stages that turn a task into the assets the env serves.

`tokenizer` (train a tokenizer on the task's corpus) → `sft` (π_SFT on demonstrations) → `preferences` (sample
groups from π_SFT, label them with simulated annotators) → `reward_training` (fit the reward model) → `assets`
(all of it from one seed into a folder, ``python -m rlhf_env.assets build``). `optimization` is how each stage
trains.
"""
