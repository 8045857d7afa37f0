"""The numerics guard: an update whose loss or gradients are non-finite has its gradients zeroed (edm2's rule),
on every rank alike, without the host ever waiting for the device.

The loss and the total gradient norm fold into one "bad" flag on the device; under torch.distributed it is
all-reduced (MAX) on the device, so a NaN on one rank zeroes the update on all of them and the replicas never
drift apart. The gradients are then masked on the device (``masked_fill_``: NaN entries too), and the optimizer
steps on zeros: no weight ever takes a non-finite value, and no update depends on reading the flag. Bad steps are
counted on the device and read where the trainer reads its logs anyway (``check``: every log step, every
checkpoint): ``bad_steps`` in stats.jsonl, and more than ``trainer.max_bad_steps`` in a row stop the run there,
before that step logs or checkpoints, so the newest checkpoint holds weights that never saw a non-finite update.
The stop signal (SIGINT / SIGTERM, interrupt.py) is a host flag: with several processes the ranks OR it through a
CPU (gloo) all-reduce each step, so they stop after the same step without a device synchronisation.
"""

from __future__ import annotations

import torch


class NonFiniteLoss(RuntimeError):
    pass


def grad_norm(params) -> torch.Tensor:
    """Total 2-norm of the parameters' gradients (0 when none has one); non-finite iff some entry is."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


class StepGuard:
    """Bad (zeroed) updates, counted per training step on the device: ``total`` steps with a bad update over the
    run (logged and checkpointed; as of the last ``check``) and the run of consecutive bad steps (the stop rule;
    a bad generator update between good critic updates still makes the step bad)."""

    def __init__(self, max_bad: int, total: int = 0, stop_signal=lambda: False, device=None):
        """``stop_signal()``: whether this process was asked to stop; ``stop`` turns true on every rank after the
        same step."""
        self.max_bad, self.total = max_bad, total
        self.stop_signal, self.stop = stop_signal, False
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self._count, self._in_a_row, self._worst = zero.clone(), zero.clone(), zero.clone()
        self._step: torch.Tensor | None = None  # this step's "some update was bad" (device bool)
        self._roles: dict[str, torch.Tensor] = {}  # role -> "bad since the last check" (device bool)
        self._group = _cpu_group()

    def screen(self, what: str, loss: torch.Tensor, norm: torch.Tensor, params) -> None:
        """Zero the gradients of ``params`` when the loss or the gradient norm is non-finite on any rank."""
        bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(norm.detach().to(loss.device)))
        bad = any_rank(bad)
        for p in params:
            if p.grad is not None:
                p.grad.masked_fill_(bad.to(p.grad.device), 0)
        self._step = bad if self._step is None else self._step | bad
        self._roles[what] = bad if what not in self._roles else self._roles[what] | bad

    def end_step(self) -> None:
        """Count the step on the device; agree on the stop signal (host flags only)."""
        if self._step is not None:
            b = self._step.to(torch.int64)
            self._count += b
            self._in_a_row = (self._in_a_row + 1) * b
            self._worst = torch.maximum(self._worst, self._in_a_row)
            self._step = None
        stop = self.stop_signal()
        if self._group is not None:
            flag = torch.tensor([int(stop)], dtype=torch.int32)
            import torch.distributed as dist

            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            stop = bool(flag.item())
        self.stop = self.stop or stop

    def check(self) -> int:
        """Read the counters (one device-to-host transfer); raise NonFiniteLoss if more than ``max_bad`` steps in a
        row were bad since the last check; return the run's bad-step total. Every rank calls it at the same steps."""
        count, worst, in_a_row = torch.stack([self._count, self._worst, self._in_a_row]).tolist()
        bad_roles = [r for r, f in self._roles.items() if bool(f)] if worst else []
        if worst > self.max_bad:
            raise NonFiniteLoss(f"{'/'.join(bad_roles)} loss or gradients were non-finite in {worst} consecutive "
                                f"steps (trainer.max_bad_steps={self.max_bad}); the newest checkpoint holds the last "
                                "good state: lower the learning rate (trainer.*_optim.lr) or enable trainer.grad_clip")
        self.total += count
        self._count.zero_()
        self._worst.fill_(in_a_row)
        self._roles.clear()
        return self.total


def any_rank(bad: torch.Tensor) -> torch.Tensor:
    """``bad`` OR-ed over the processes, on the device (no host wait)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = bad.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.bool()
    return bad


def _cpu_group():
    """A process group whose collectives run on CPU tensors (gloo), for host flags; None with one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
