"""rlhf-gym's environment package: tasks, the RLHF world they build, and the token-level Gymnasium env.

Importing it registers the environments:

* ``RLHF-v0``: the default task (sentiment) with its shipped π_SFT, π_ref and reward model;
  ``gym.make_vec("RLHF-v0", num_envs=N)`` gives the native batched `RLHFVectorEnv`.
"""

from gymnasium.envs.registration import register

__version__ = "0.1.0"

register(
    id="RLHF-v0",
    entry_point="rlhf_env.env:RLHFEnv",
    vector_entry_point="rlhf_env.vector_env:RLHFVectorEnv",
    kwargs={"task": "sentiment"},
)
