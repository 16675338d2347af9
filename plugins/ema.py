"""The `ema` regularizer: evaluates an exponential moving average of the weights instead of the weights."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from l2cluster.plugin import Regularizer


class EMA(Regularizer):
    """Exponential moving average of the weights (Polyak averaging), updated after every optimizer step,
    θ̄ ← decay·θ̄ + (1 − decay)·θ, and used for validation and test; training continues from θ. The same numbers
    as torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay)) updated after every
    step: the first update copies θ, later ones lerp. The average is per-job state, saved in checkpoints."""

    name = "ema"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

        decay: float = Field(0.999, ge=0, lt=1)
        """How much of the average each step keeps (0.999: an average over roughly the last 1000 steps)."""

    def init_state(self, params):
        # AveragedModel starts from a copy of the model and counts its updates.
        state = {name: p.detach().clone() for name, p in params.items()}
        state["updates"] = torch.zeros(next(iter(params.values())).shape[0], dtype=torch.long,
                                       device=next(iter(params.values())).device)
        return state

    @torch.no_grad()
    def after_step(self, params, hp, state):
        first = state["updates"] == 0  # [K]
        weight = (1 - hp.double("decay"))  # 1 − decay as Python computes it, like AveragedModel's lerp weight
        for name, p in params.items():
            avg = state[name]
            shape = (-1, *([1] * (p.dim() - 1)))
            lerped = torch.lerp(avg, p, weight.to(p.dtype).view(shape))
            avg.copy_(torch.where(first.view(shape), p, lerped))
        state["updates"] += 1

    def eval_params(self, params, state):
        return {name: state[name] for name in params}
