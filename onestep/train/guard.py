"""The numerics guard: an update whose loss or gradients are non-finite is skipped, on every rank alike.

The loss and the total gradient norm fold into one finiteness flag on the device, read once per update (the
one host sync the plain loss check already had). Under torch.distributed the flag is all-reduced with MIN
first, so a NaN on one rank skips the update on all of them and the replicas never drift apart.
Steps with a skipped update are counted (``bad_steps`` in stats.jsonl); more than ``trainer.max_bad_steps`` of
them in a row stop the run before that step logs or checkpoints, so the newest checkpoint is the last good state.
"""

from __future__ import annotations

import torch


class NonFiniteLoss(RuntimeError):
    pass


def finite_on_all_ranks(ok: torch.Tensor) -> bool:
    """``ok`` (this rank's 0-dim bool tensor) AND-ed over every process of the default group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = ok.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)
    return bool(ok)


def grad_norm(params) -> torch.Tensor:
    """Total 2-norm of the parameters' gradients (0 when none has one); non-finite iff some entry is."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


class StepGuard:
    """Skipped updates, counted per training step: ``total`` steps with a skipped update over the run (logged
    and checkpointed) and ``in_a_row`` (the stop rule; a NaN generator between good critic updates still counts)."""

    def __init__(self, max_bad: int, total: int = 0):
        self.max_bad, self.total, self.in_a_row = max_bad, total, 0
        self.skipped: list[str] = []  # roles whose update was skipped in the current step

    def ok(self, what: str, loss: torch.Tensor, norm: torch.Tensor) -> bool:
        good = finite_on_all_ranks(torch.isfinite(loss.detach()) & torch.isfinite(norm.to(loss.device)))
        if not good:
            self.skipped.append(what)
        return good

    def end_step(self) -> None:
        """Close the step's count; raises NonFiniteLoss after more than ``max_bad`` bad steps in a row."""
        if not self.skipped:
            self.in_a_row = 0
            return
        roles, self.skipped = "/".join(dict.fromkeys(self.skipped)), []
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row > self.max_bad:
            raise NonFiniteLoss(f"{roles} loss or gradients were non-finite in {self.in_a_row} consecutive steps "
                                f"(trainer.max_bad_steps={self.max_bad}); the newest checkpoint holds the last good "
                                "state: lower the learning rate (trainer.*_optim.lr) or enable trainer.grad_clip")
