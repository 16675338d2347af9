"""The `l1` regularizer: adds λ·Σ|w| to each model's loss (lasso; pushes weights to exactly zero)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from l2cluster.plugin import Regularizer, select_params


class L1(Regularizer):
    """L1 penalty in the loss: λ·Σ|w| per model, whose gradient is λ·sign(w). With `l2` beside it, this is the
    elastic net."""

    name = "l1"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

        strength: float = Field(1e-5, ge=0, le=10)
        """λ in λ·Σ|w|, added to each model's loss."""
        exclude_bias_and_1d: bool = True
        """Leave biases and other 1-D parameters out of the penalty, as timm and most recipes do."""

    def penalty(self, params, hp):
        # Σ|w| per model: every axis but the leading model axis is reduced, [K].
        total = torch.stack([p.abs().flatten(1).sum(1) for p in select_params(params, hp.exclude_bias_and_1d)])
        return hp.strength * total.sum(0)
