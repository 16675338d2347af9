"""The `l2` regularizer: adds (λ/2)·Σ‖w‖² to each model's loss, the classic L2 penalty."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from l2cluster.plugin import Regularizer, select_params, sum_of_squares


class L2(Regularizer):
    """L2 penalty in the loss. With SGD it equals SGD's weight_decay; with Adam it does not equal AdamW's
    decoupled decay (Adam rescales the penalty's gradient per coordinate) — use `decoupled_decay` for that."""

    name = "l2"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

        strength: float = Field(1e-4, ge=0, le=10)
        """λ in (λ/2)·Σ‖w‖², added to each model's loss (the gradient gains λ·w)."""
        exclude_bias_and_1d: bool = True
        """Leave biases and other 1-D parameters out of the penalty, as timm and most recipes do."""

    def penalty(self, params, hp):
        # Σ‖w‖² per model (every axis but the leading model axis is reduced): shape [K].
        return 0.5 * hp.strength * sum_of_squares(select_params(params, hp.exclude_bias_and_1d))
