"""Running models token by token: `batched` (the KV-cache decoder both envs and the sampler step, M models over B
rows), `gpt2` (the lean GPT-2 forward behind the ``"gpt2"`` backend), `sampling` (the one sampler, Gumbel-max)."""
