"""rlhf-gym's environment package: tasks, the RLHF world they build, and the token-level Gymnasium env.

Importing it registers the environments, each with the native `RLHFVectorEnv` as its vector entry point
(``gym.make_vec(id, num_envs=N)``):

* ``RLHF-v0``: the default task (sentiment) with its shipped π_SFT, π_ref and reward model;
* one id per built-in task with that task's shipped assets: ``RLHF-Sentiment-v0``, ``RLHF-Verbose-v0``,
  ``RLHF-Arithmetic-v0``.
"""

from gymnasium.envs.registration import register

from rlhf_env.tasks import DEFAULT_TASK, TASKS

__version__ = "0.2.0"


def env_id(task: str) -> str:
    """The registered id of a built-in task's env, e.g. ``"RLHF-Arithmetic-v0"``."""
    return f"RLHF-{task.capitalize()}-v0"


for _task in ["default", *TASKS]:
    register(
        id="RLHF-v0" if _task == "default" else env_id(_task),
        entry_point="rlhf_env.env:RLHFEnv",
        vector_entry_point="rlhf_env.vector_env:RLHFVectorEnv",
        kwargs={"task": DEFAULT_TASK if _task == "default" else _task},
    )
