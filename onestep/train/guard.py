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


def agree(ok: torch.Tensor, stop: bool = False) -> tuple[bool, bool]:
    """(``ok`` AND-ed, ``stop`` OR-ed over every process of the default group): this rank's 0-dim bool tensor
    "loss and gradients finite" and its "a stop signal arrived", in one all-reduce, so that every rank skips
    the same updates and stops after the same step."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flags = torch.stack([(~ok.bool()).to(torch.int32), torch.tensor(int(stop), dtype=torch.int32,
                                                                          device=ok.device)])
        dist.all_reduce(flags)  # sums: any bad rank, any stopping rank
        bad, stops = flags.tolist()
        return bad == 0, stops > 0
    return bool(ok), stop


def finite_on_all_ranks(ok: torch.Tensor) -> bool:
    """``ok`` (this rank's 0-dim bool tensor) AND-ed over every process of the default group."""
    return agree(ok)[0]


def grad_norm(params) -> torch.Tensor:
    """Total 2-norm of the parameters' gradients (0 when none has one); non-finite iff some entry is."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


class StepGuard:
    """Skipped updates, counted per training step: ``total`` steps with a skipped update over the run (logged
    and checkpointed) and ``in_a_row`` (the stop rule; a NaN generator between good critic updates still counts)."""

    def __init__(self, max_bad: int, total: int = 0, stop_signal=lambda: False):
        """``stop_signal()``: whether this process was asked to stop (SIGINT / SIGTERM, train/interrupt.py); the
        ranks agree on it with the finiteness flag, and ``stop`` turns true on all of them in the same update."""
        self.max_bad, self.total, self.in_a_row = max_bad, total, 0
        self.skipped: list[str] = []  # roles whose update was skipped in the current step
        self.stop_signal, self.stop = stop_signal, False

    def ok(self, what: str, loss: torch.Tensor, norm: torch.Tensor) -> bool:
        good, stop = agree(torch.isfinite(loss.detach()) & torch.isfinite(norm.to(loss.device)), self.stop_signal())
        self.stop = self.stop or stop
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
