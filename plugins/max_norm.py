"""The `max_norm` regularizer: after every step, caps the norm of each unit's incoming weight vector."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from l2cluster.plugin import Regularizer, per_model_ndim


class MaxNorm(Regularizer):
    """Max-norm constraint (Srebro et al. 2005; with dropout in Srivastava et al. 2014): after each optimizer step
    every unit's incoming weights w[k, :, j] (layout [K, in, out]) with ‖·‖₂ > c are rescaled to norm c, as
    torch.renorm(weight, 2, 0, c) does on an nn.Linear weight [out, in]. Biases are left alone."""

    name = "max_norm"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

        max_norm: float = Field(3.0, gt=0)
        """c: the largest L2 norm a unit's incoming weight vector may have."""
        include_output: bool = True
        """Constrain the output layer's units too (False: hidden layers only)."""

    @torch.no_grad()
    def after_step(self, params, hp):
        weights = [p for p in params.values() if per_model_ndim(p) == 2]
        if not hp.include_output:
            weights = weights[:-1]
        c = hp.max_norm.view(-1, 1, 1)
        for w in weights:
            norm = torch.linalg.vector_norm(w, dim=1, keepdim=True)  # [K, 1, out]: one per unit
            # torch.renorm's rule: scale by c / (norm + 1e-7) where the norm exceeds c.
            w.mul_(torch.where(norm > c, c / (norm + 1e-7), torch.ones_like(norm)))
