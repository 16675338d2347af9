"""The `dropout` regularizer: zeroes hidden activations with probability p in training, identity in eval."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from l2cluster.plugin import Regularizer


class Dropout(Regularizer):
    """Inverted dropout (Srivastava et al. 2014) after every hidden layer's activation: kept units are scaled
    by 1/(1−p) so evaluation needs no rescaling."""

    name = "dropout"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

        p: float | list[float] = Field(0.2)
        """Drop probability: one value for every hidden layer, or a list with one value per hidden layer."""

        @field_validator("p")
        @classmethod
        def _in_range(cls, v):
            for x in v if isinstance(v, list) else [v]:
                if not 0 <= x < 1:
                    raise ValueError(f"drop probability must be in [0, 1), got {x}")
            if isinstance(v, list) and not v:
                raise ValueError("give one probability per hidden layer, or a single number")
            return v

    def on_activation(self, x, layer, num_layers, hp, rng):
        p = hp.p
        if p.dim() == 2:  # one probability per hidden layer: [K, L]
            if p.shape[1] != num_layers:
                raise ValueError(
                    f"p lists {p.shape[1]} probabilities but the model has {num_layers} hidden layers"
                )
            p = p[:, layer]
        p = p.to(x.dtype).view(-1, 1, 1)  # [K, 1, 1] against x [K, B, H]
        # The mask holds 0 or 1/(1-p), so forward and backward are one multiply each; built in place in the
        # uniform draws (ge_ writes 1.0 or 0.0 in their dtype).
        mask = rng.rand(*x.shape[1:], dtype=x.dtype).ge_(p).mul_(1 / (1 - p))
        return x * mask
