"""Data parallelism that reproduces one process: N processes with a global batch B give the run that one process
with batch B gives (up to float summation order).

Rank r of W holds rows [r n, (r+1) n) of the global batch, n = B / W:
  data     every rank draws the global batch from the same RNG state and keeps its rows (``batch``);
  draws    inside the losses, every draw from torch's global RNG whose leading dimension is n (noise, t, dropout
           of the condition, ...) or k n (k batches concatenated) is made at the global size and sliced the same
           way (``SameDraws``), so the ranks consume the RNG stream exactly as one process does and hold, for
           their rows, the numbers one process holds for them. Draws of other shapes (a step-wide coin, a t-list
           index) come out equal on every rank, as in one process;
  gradients are averaged over ranks (``Networks.reduce_gradients``): each rank's loss is a mean over its n rows,
           so the average is the mean over the B rows. Per-batch statistics inside objectives are summed over
           ranks where they are computed (f-distill's time-bin means);
  logs     are averaged over ranks before the main process writes them.
Not covered, so those runs are valid data-parallel runs but not the 1-process numbers: random ops whose
randomness depends on per-row inputs (``torch.bernoulli`` of a probability tensor, ``nn.Dropout`` in a
network, multinomial over per-row weights).

Gradient accumulation (trainer.grad_accum = K) is the same placement one level up: an update's K micro-batches of B
rows are the K B rows of one big batch, and micro-batch k on rank r holds the rows of slot k W + r of K W slots of n
rows. Every rank draws the K B rows of data at once; every micro-batch makes the update's draws at the K B size from
the RNG state the first one began with (``draws`` puts the state back after each micro-batch but the last) and keeps
its slot's rows; the last leaves the RNG where the big batch's update would. So K micro-batches of B, each loss
scaled by 1 / K, give the gradients, and the update, of one batch of K B rows (up to float summation order).
Objectives whose loss is not a mean of per-row terms refuse K > 1 (``Objective.accumulation_refusal``).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch.overrides import TorchFunctionMode

from onestep.core import Batch
from onestep.errors import ConfigError

_SIZED = {torch.rand, torch.randn, torch.randint}
_LIKE = {torch.rand_like, torch.randn_like, torch.randint_like}
_IN_PLACE = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.random_, torch.Tensor.exponential_,
             torch.Tensor.cauchy_, torch.Tensor.log_normal_, torch.Tensor.geometric_}
_MULTINOMIAL = {torch.multinomial, torch.Tensor.multinomial}


def _size(args: tuple) -> tuple:
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else tuple(args)


class SameDraws(TorchFunctionMode):
    """Global-RNG draws whose leading dimension is k n (k blocks of n rows: a batch, or k batches concatenated, as
    real and fake samples of a discriminator loss) are made for k blocks of ``world * n`` rows, of which this rank
    keeps its n rows in each block: what one process draws for the same rows of the same concatenation."""

    def __init__(self, n: int, world: int, rank: int):
        super().__init__()
        self.n, self.world, self.rank = n, world, rank

    def _blocks(self, shape) -> int:
        shape = tuple(shape)
        return shape[0] // self.n if shape and shape[0] and shape[0] % self.n == 0 else 0

    def _grown(self, shape, k: int) -> tuple:
        return (k * self.world * self.n, *tuple(shape)[1:])

    def _mine(self, full: torch.Tensor, k: int) -> torch.Tensor:
        return full.view(k, self.world, self.n, *full.shape[1:])[:, self.rank].reshape(k * self.n, *full.shape[1:])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("generator") is not None or kwargs.get("out") is not None:
            return func(*args, **kwargs)  # a private stream: drawn as the caller asked
        if func in _SIZED:
            if "size" in kwargs:
                k = self._blocks(kwargs["size"])
                if k:
                    return self._mine(func(*args, **{**kwargs, "size": self._grown(kwargs["size"], k)}), k)
            elif func is torch.randint:  # randint(high, size) / randint(low, high, size)
                size = args[-1] if args and isinstance(args[-1], (tuple, list, torch.Size)) else ()
                k = self._blocks(size)
                if k:
                    return self._mine(func(*args[:-1], self._grown(size, k), **kwargs), k)
            else:
                size = _size(args)
                k = self._blocks(size)
                if k:
                    return self._mine(func(self._grown(size, k), **kwargs), k)
        elif func in _LIKE or func in _IN_PLACE:
            k = self._blocks(args[0].shape)
            if k:
                full = args[0].new_empty(self._grown(args[0].shape, k))
                if func in _LIKE:
                    return self._mine(func(full, *args[1:], **kwargs), k)
                func(full, *args[1:], **kwargs)
                return args[0].copy_(self._mine(full, k))
        elif func in _MULTINOMIAL:
            probs = args[0]
            count = args[1] if len(args) > 1 else kwargs.get("num_samples")
            k = self._blocks((count,)) if probs.ndim == 1 else 0
            if k:
                rest = {key: v for key, v in kwargs.items() if key != "num_samples"}
                return self._mine(func(probs, k * self.world * self.n, *args[2:], **rest), k)
        return func(*args, **kwargs)


class DataParallel:
    """This process's share of each global batch and of each micro-batch (see the module docstring); one process
    without accumulation: the identity."""

    def __init__(self, acc, batch_size: int, accum: int = 1):
        self.world, self.rank = acc.num_processes, acc.process_index
        if batch_size % self.world:
            raise ConfigError(f"trainer.batch_size={batch_size} is the global batch and must divide evenly over "
                              f"the {self.world} processes; pass a multiple of {self.world}")
        self.n = batch_size // self.world
        self.accum = accum
        self._acc = acc

    def batches(self, data, device) -> list[Batch]:
        """This rank's rows of each of the update's ``accum`` micro-batches (every rank draws all of their rows from
        the same RNG state; a source that splits itself over the processes, ``per_rank``, as streamed shards do,
        gives this rank's rows of each micro-batch itself)."""
        if getattr(data, "per_rank", False):
            return [data.batch(self.n, device) for _ in range(self.accum)]
        b = data.batch(self.accum * self.world * self.n, device)
        if self.accum * self.world == 1:
            return [b]
        return [_rows(b, slice(s * self.n, (s + 1) * self.n))
                for s in (k * self.world + self.rank for k in range(self.accum))]

    @contextmanager
    def draws(self, k: int = 0):
        """The context the losses of micro-batch ``k`` run in."""
        slots = self.world * self.accum
        place = SameDraws(self.n, slots, k * self.world + self.rank) if slots > 1 else nullcontext()
        replay = _kept_rng(self._acc.device) if k < self.accum - 1 else nullcontext()
        with replay, place:
            yield

    def mean(self, logs: dict[str, float]) -> dict[str, float]:
        """Logged scalars averaged over ranks (a mean over the global batch); every rank must call it."""
        if self.world == 1 or not logs:
            return logs
        values = self._acc.reduce(torch.tensor(list(logs.values()), dtype=torch.float64, device=self._acc.device),
                                  reduction="mean")
        return dict(zip(logs, values.tolist()))


def _rows(b: Batch, rows: slice) -> Batch:
    return Batch(noise=b.noise[rows], cond=None if b.cond is None else b.cond[rows],
                 real=None if b.real is None else b.real[rows])


def _kept_rng(device):
    """Inside, torch's global RNG (the CPU's and ``device``'s) draws as usual; on leaving it is back where it was."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)
