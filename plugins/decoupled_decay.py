"""The `decoupled_decay` regularizer: w ← w·(1 − lr_t·wd) at every step (Loshchilov & Hutter, arXiv:1711.05101)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from l2cluster.plugin import Regularizer, select_params


class DecoupledDecay(Regularizer):
    """Weight decay decoupled from the gradient, as torch.optim.AdamW does it: the weights shrink by lr_t·wd
    per step, with lr_t the current scheduled learning rate. Adam + this plugin ≡ AdamW(weight_decay=wd)."""

    name = "decoupled_decay"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

        weight_decay: float = Field(1e-2, ge=0, le=100)
        """wd: each step multiplies the weights by (1 − lr_t·wd)."""
        exclude_bias_and_1d: bool = True
        """Leave biases and other 1-D parameters undecayed, as timm and most recipes do."""

    @torch.no_grad()
    def before_step(self, params, hp, lr):
        # torch's AdamW decays the pre-step weights, then applies the Adam update; decaying here, right
        # before the optimizer step, reproduces it exactly (decaying after the step differs by lr²·wd·update).
        factor = 1 - lr * hp.weight_decay  # [K]
        for p in select_params(params, hp.exclude_bias_and_1d):
            p.mul_(factor.view(-1, *([1] * (p.dim() - 1))))
