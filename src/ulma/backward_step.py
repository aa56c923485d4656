"""``train.optimizer_in_backward``: the optimizer step taken inside the backward.

A parameter's update (AdamW's) needs only its own gradient, so it can be applied as soon
as that gradient is complete, which autograd announces with a post-accumulate-grad hook;
the gradient is then freed.  The step's gradients never exist all at once: full
fine-tuning holds one float32 copy of the model less at its peak (torchtune's
``optimizer_in_bwd``, LOMO's fused update).

What it costs: the update of the first parameters is applied before the last gradients
exist, so nothing that needs every gradient first can run: no clipping to a global norm
and no accumulation over micro-batches (both refused by the Trainer), and no all-reduce
of gradients between processes after the hooks (one process only).  Without those, each
parameter's update is exactly the one a step after the whole backward would make.

It drives the run's own optimizer, one parameter at a time: when a hook fires, that
parameter is the only one with a gradient (the others are not reached yet or already
freed), and ``optimizer.step()`` skips parameters without one.  The optimizer, its state
and its learning-rate schedule are those of an ordinary run: checkpoints and resuming
are unchanged.
"""

from __future__ import annotations

import torch


class BackwardStep:
    """Applies ``optimizer`` to each of ``params`` in the backward, then frees its gradient.

    A parameter whose gradient is not finite is left as it is (its update only: the others
    may have been applied already).  With torch's fused AdamW this is decided on the device,
    without waiting for it: the optimizer's ``found_inf`` (the protocol of ``GradScaler``)
    makes the kernel skip the update and keep the step count.  Other optimizers read the
    flag on the host.  :meth:`finish` returns the step's global gradient norm (float32
    [], for the log) and how many parameters were left, and starts the next step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list, fused: bool):
        self.optimizer, self.fused = optimizer, fused
        self.norms: list[torch.Tensor] = []  # [] float32 per parameter, this step
        self.bad: list[torch.Tensor] = []  # [] bool per parameter: its gradient was not finite
        self.handles = [p.register_post_accumulate_grad_hook(self._update) for p in params]

    def _update(self, p: torch.Tensor) -> None:
        norm = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
        bad = ~torch.isfinite(norm)
        self.norms.append(norm)
        self.bad.append(bad)
        if self.fused:
            self.optimizer.found_inf = bad.float()  # read by the fused kernel: 1 skips the update
            try:
                self.optimizer.step()
            finally:
                self.optimizer.found_inf = None
        elif not bool(bad):
            self.optimizer.step()
        p.grad = None

    def finish(self) -> tuple[torch.Tensor, int]:
        """(global gradient norm, parameters not updated) of the step; resets for the next one."""
        norms, bad = self.norms, self.bad
        self.norms, self.bad = [], []
        if not norms:  # no gradient reached any parameter (e.g. a step of zero weight)
            return torch.zeros(()), 0
        return torch.linalg.vector_norm(torch.stack(norms)), int(torch.stack(bad).sum())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
