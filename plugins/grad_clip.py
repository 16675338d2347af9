"""The `grad_clip` regularizer: clips each model's gradients by norm or by value, after the DDP all-reduce."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from l2cluster.plugin import Regularizer


class NonFiniteGradients(RuntimeError):
    """Raised when on_nonfinite is "fail" and some model's gradient norm is inf or NaN."""


class GradClip(Regularizer):
    """Gradient clipping per model — never a norm across models trained together. In norm mode a model whose
    gradient norm is not finite skips its optimizer step (counted as `skipped_steps`), or fails the job."""

    name = "grad_clip"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

        mode: Literal["norm", "value"] = "norm"
        """"norm": rescale the whole gradient when its norm exceeds max_norm; "value": clamp each element."""
        max_norm: float = Field(1.0, gt=0)
        """Norm mode: the largest gradient norm allowed, per model, over all of its parameters."""
        norm_type: float = Field(2.0, gt=0)
        """Norm mode: the p of the p-norm (2 = Euclidean; use a large number such as 1e9 for max-norm)."""
        max_value: float = Field(1.0, gt=0)
        """Value mode: each gradient element is clamped to [-max_value, max_value]."""
        on_nonfinite: Literal["skip", "fail"] = "skip"
        """What to do when a model's gradient norm is inf or NaN: skip that model's step, or fail the job ("fail"
        reads the norm on the host every step, so the job trains without CUDA graphs)."""

        @model_validator(mode="after")
        def _finite(self):
            if self.norm_type == float("inf"):
                raise ValueError("norm_type: give a finite number (e.g. 1e9) instead of inf")
            return self

    @torch.no_grad()
    def on_gradients(self, params, hp):
        grads = [p.grad for p in params.values() if p.grad is not None]
        if hp.mode == "value":
            limits = [hp.max_value.view(-1, *([1] * (g.dim() - 1))) for g in grads]
            # Counted before clamping (afterwards no element exceeds the limit).
            clipped = torch.stack([(g.abs() > lim).flatten(1).any(1) for g, lim in zip(grads, limits)]).any(0)
            for g, lim in zip(grads, limits):
                torch.clamp(g, min=-lim, max=lim, out=g)
            return {"clipped": clipped}
        p = float(hp.shared("norm_type"))
        # Per-model norm over all parameters: the p-norm of the per-parameter p-norms.
        per_param = torch.stack([torch.linalg.vector_norm(g.flatten(1), ord=p, dim=1) for g in grads])
        norm = torch.linalg.vector_norm(per_param, ord=p, dim=0)  # [K]
        finite = torch.isfinite(norm)
        if hp.on_nonfinite == "fail" and norm.is_cuda and torch.cuda.is_current_stream_capturing():
            # Raising needs the norm on the host: a wait for the GPU, which a CUDA graph cannot hold. The trainer
            # catches this, trains eagerly and logs the reason.
            raise RuntimeError("on_nonfinite: fail reads the gradient norm on the host every step, which a CUDA "
                               "graph cannot capture; use on_nonfinite: skip to train under CUDA graphs")
        if hp.on_nonfinite == "fail" and not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise NonFiniteGradients(f"gradient norm is not finite for model(s) {bad}: {norm.tolist()}")
        scale = torch.where(finite, (hp.max_norm / (norm + 1e-6)).clamp(max=1.0), torch.ones_like(norm))
        for g in grads:
            g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))
        return {"clipped": finite & (norm > hp.max_norm), "skip": ~finite}
