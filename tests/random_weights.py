"""Random weights for the small transformers models the parity tests build."""

import torch


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (transformers zero-initialises biases and query tokens), norms near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif "embedding" in name or "query_tokens" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.05 * noise)
    return model
