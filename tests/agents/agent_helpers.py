"""Helpers the agent tests share."""

import hashlib


def digest(module) -> str:
    """A hash of every tensor of `module`'s state dict (bit-exact comparisons of whole models)."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()
