"""The `label_smoothing` regularizer: trains against (1 − ε)·target + ε/C instead of the one-hot target."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from l2cluster.plugin import Regularizer


class LabelSmoothing(Regularizer):
    """Label smoothing (Szegedy et al. 2016, arXiv:1512.00567): each example's loss becomes
    (1 − ε)·CE(target) + ε·mean over classes of −log p, which is F.cross_entropy(..., label_smoothing=ε). Works
    with soft targets too (after mixup), as torch's does."""

    name = "label_smoothing"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

        epsilon: float = Field(0.1, ge=0, le=1)
        """ε: the probability mass spread evenly over all classes."""

    def example_penalty(self, logits, targets, hp):
        # The trainer already adds CE(q) = −Σ q·log p; adding ε·(CE(uniform) − CE(q)) makes the loss
        # (1 − ε)·CE(q) + ε·CE(uniform), the cross-entropy against the smoothed target (1 − ε)·q + ε/C.
        logp = F.log_softmax(logits, dim=-1)  # [K, B, C]
        if targets.is_floating_point():  # class probabilities [K, B, C]
            ce_target = -(targets * logp).sum(-1)
        else:  # class indices [K, B]
            ce_target = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ce_uniform = -logp.mean(-1)
        return hp.epsilon.to(logits.dtype).view(-1, 1) * (ce_uniform - ce_target)
