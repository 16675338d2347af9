"""The `mixup` regularizer: trains on convex combinations of pairs of examples and of their labels."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from l2cluster.plugin import Regularizer


class Mixup(Regularizer):
    """mixup (Zhang et al. 2018, arXiv:1710.09412): each batch is mixed with a shuffled copy of itself,
    x̃ = λ·x + (1 − λ)·x[π], ỹ = λ·y + (1 − λ)·y[π], with λ ~ Beta(α, α) drawn once per batch and model, as the
    paper's code does. The loss against the soft target ỹ equals λ·CE(y) + (1 − λ)·CE(y[π]). The global batch
    is mixed, so any number of DDP ranks sees the same examples."""

    name = "mixup"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

        alpha: float = Field(0.2, gt=0, le=100)
        """α of Beta(α, α), the distribution of the mixing weight λ: small α mixes little (λ near 0 or 1)."""

    def on_batch(self, x, targets, hp, rng, ctx):
        K, B = targets.shape[:2]
        lam = rng.beta(hp.alpha).to(x.dtype)  # [K], one per batch and model
        perm = rng.permutation(B)  # [K, B]
        if not targets.is_floating_point():  # class indices → one-hot probabilities
            targets = x.new_zeros(K, B, ctx.num_classes).scatter_(-1, targets.unsqueeze(-1), 1.0)
        rows = torch.arange(K, device=x.device).unsqueeze(1)
        lam_x, lam_t = lam.view(-1, 1, 1), lam.view(-1, 1, 1)
        mixed_x = lam_x * x + (1 - lam_x) * x[rows, perm]
        mixed_t = lam_t * targets + (1 - lam_t) * targets[rows, perm]
        return mixed_x, mixed_t
