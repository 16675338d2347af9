"""CUDA graphs: one training step captured once and replayed for every later step.

One job is bound by kernel launches on a GPU (~110 per step); replaying a captured step removes them. What a
replay needs, and this module owns:
- the batch's indices live in one device buffer that each replay reads (`CapturedStep`);
- the random streams (dropout, batch transforms) are registered with the graph, so each replay draws anew;
- the learning rate is a device tensor that the captured optimizer step reads (`DeviceLR`): the optimizer is
  built capturable, and every new lr — a scheduler's step, a checkpoint's — is copied into that tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from l2cluster.registry import PluginInfo


def why_not(device: torch.device, world: int, plugins: Sequence[PluginInfo]) -> str | None:
    """Why a stack on `device` in `world` processes with these plugins cannot replay a captured step, or None.
    A graph needs CUDA, one process (DDP's all-reduce runs between steps), and no hook in the step that takes
    `epoch` or `step` (their values would be frozen into the graph). A hook that reads device values on the
    host fails the capture instead (CapturedStep.error)."""
    if device.type != "cuda":
        return f"not on a CUDA device ({device.type})"
    if world != 1:
        return f"DDP with {world} processes (the all-reduce runs between steps)"
    for info in plugins:
        for name, h in info.hooks.items():
            frozen = sorted({"epoch", "step"} & set(h.args))
            if frozen and name not in ("init_state", "eval_params"):  # these run outside the step
                return f"plugin {info.name!r}, hook {name!r} takes {' and '.join(frozen)} (a graph would freeze it)"
    return None


class CapturedStep:
    """Runs a step function eagerly a few times, then captures it in a CUDA graph and replays that graph.

    `step(idx, run)` runs one step on the batch indices `idx` [K, B]; `run(idx)` is the eager step. If the
    capture fails (something in the step cannot be captured), `error` says why and that step runs eagerly; the
    caller trains eagerly from then on."""

    def __init__(self, optimizer: torch.optim.Optimizer, generators: Sequence[torch.Generator],
                 eager_steps: int = 3):
        self.optimizer = optimizer
        self.generators = list(generators)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.error: str | None = None
        self._idx: torch.Tensor | None = None  # the buffer the graph reads the batch indices from
        self._eager_left = eager_steps  # capture needs a few real steps first (optimizer state, cuBLAS workspaces)

    def step(self, idx: torch.Tensor, run: Callable[[torch.Tensor], None]) -> None:
        if self.graph is None and self._eager_left > 0:
            self._eager_left -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                run(idx)
            torch.cuda.current_stream().wait_stream(side)
            return
        if self.graph is None:
            self._idx = idx.clone()
            graph = torch.cuda.CUDAGraph()
            # Random draws (dropout, batch transforms) advance with every replay, as they would eagerly.
            for gen in self.generators:
                graph.register_generator_state(gen)
            self.optimizer.zero_grad(set_to_none=True)
            try:
                with torch.cuda.graph(graph):
                    run(self._idx)  # recorded, not run: the replay below runs it
            except RuntimeError as e:
                self.error = f"{type(e).__name__}: {e}"
                torch.cuda.synchronize()
                run(idx)
                return
            self.graph = graph
        # type-check: made when the graph was captured, before any replay
        self._idx.copy_(idx)  # type: ignore[union-attr]
        self.graph.replay()


class DeviceLR:
    """The learning rate as the device tensor a captured optimizer step reads (a no-op for a float lr)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        lr = optimizer.param_groups[0]["lr"]
        self.tensor = lr if isinstance(lr, torch.Tensor) else None

    def after_schedule(self) -> None:
        """A scheduler assigns a new float lr: copy it into the tensor, and put the tensor back in its place."""
        group = self.optimizer.param_groups[0]
        if self.tensor is not None and group["lr"] is not self.tensor:
            self.tensor.fill_(float(group["lr"]))
            group["lr"] = self.tensor

    def load_state_dict(self, state: dict) -> None:
        """Load the optimizer's state; the checkpoint's lrs land in the device tensors the graph reads."""
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state)
        for group, lr in zip(self.optimizer.param_groups, lrs):
            if isinstance(lr, torch.Tensor):
                group["lr"] = lr.copy_(torch.as_tensor(group["lr"]))
