"""FSDP for the trained networks: torch's FSDP2 (``fully_shard``), applied by the Networks seam.

``trainer.fsdp=true`` (or an accelerate launch with an FSDP config, ``ACCELERATE_USE_FSDP=true``) shards the
generator, the critic and the frozen teacher over the processes: the trained networks' parameters, gradients and
AdamW moments (16 bytes per trained parameter in fp32) and the teacher's weights live 1/N per rank; each block is
gathered for its forward and backward (blocks: the members of the network's ModuleLists, innermost first, then
the rest). The EMA / target copies and the small heads stay replicated. Where the main process runs a sharded
network alone (the teacher in objective.prepare's cached teacher pairs and the final evaluation; the generator
itself when trainer.ema_decay=0 makes it the evaluated network) every rank first gathers it whole (``whole``) and
frees it afterwards.

Why not accelerate's FSDP plugin: it prepares one model per optimizer, not a frozen teacher or targets that
move with the generator, and on CPU (distributed type MULTI_CPU) it falls back to DDP without a word; torch's
FSDP1 needs an accelerator device. FSDP2 runs on CPU with gloo, which is what the tests use.

Checkpoints: under FSDP the default (trainer.checkpoint_format=auto) is torch.distributed.checkpoint's sharded
format, written and read in this layout by every rank (checkpoint.py). The safetensors format gathers every tensor
(``gather``), the main process writes, and loading slices the whole tensors back into shards (``assign``); a run
resumes from either under FSDP, DDP or one process alike.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn

from onestep.errors import ConfigError

MIXED = {"bf16": torch.bfloat16, "fp16": torch.float16}


def requested(cfg) -> bool:
    return bool(cfg.trainer.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def shard(net: nn.Module, mixed_precision: str = "no") -> bool:
    """fully_shard every block of ``net`` (members of its ModuleLists that are not single layers, the innermost first: a diffusers UNet's
    down_blocks[i] holds ModuleLists of resnets and attentions), then ``net``. Every unit, the root too, is freed
    after its forward and gathered again for backward: the critic and generator run several forwards per update
    (teacher-critic pairs, GAN passes), which would otherwise keep them whole until the backward. A frozen network
    (the teacher, already in its frozen dtype) is sharded the same way with no mixed-precision cast. False when
    ``net`` has no parameters (the exact GMM teacher): nothing to shard."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if not any(True for _ in net.parameters()):
        return False
    trained = any(p.requires_grad for p in net.parameters())
    mp = MixedPrecisionPolicy(param_dtype=MIXED.get(mixed_precision) if trained else None,
                              reduce_dtype=torch.float32)
    # (a lone layer in a list, like diffusers' attention to_out[0], is too small to be a unit of its own)
    blocks = [m for lst in net.modules() if isinstance(lst, nn.ModuleList) for m in lst
              if any(True for _ in m.children()) and any(True for _ in m.parameters())]
    for m in reversed(blocks):  # pre-order reversed: every block before the blocks that contain it
        fully_shard(m, mp_policy=mp, reshard_after_forward=True)
    fully_shard(net, mp_policy=mp, reshard_after_forward=True)
    for entry in ("features", "spatial_features"):  # GAN heads read the critic's features: more entry points
        if hasattr(net, entry):
            register_fsdp_forward_method(net, entry)
    return True


@contextmanager
def whole(net: nn.Module):
    """Inside, every FSDP unit of ``net`` holds its whole parameters, so one process may run ``net`` alone (the
    main process's evaluation). Entering gathers (a collective: every rank enters, in the same order); leaving
    frees the gathered copies (local) and restores resharding after each forward. A no-op for plain modules."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in net.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield net
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def sync_gradients(net: nn.Module, sync: bool) -> None:
    """FSDP2's gradient reduce-scatter after ``net``'s backward on (``sync``) or off: off, every unit keeps its
    unsharded gradients and adds the next backward's to them, reduced once when a backward runs with it on (the
    first micro-batches of an accumulated update). A no-op for a plain module."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(net, FSDPModule):
        net.set_requires_gradient_sync(sync)  # (recurses into the block units)


try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without torch.distributed: nothing is ever sharded
    DTensor = ()


def is_sharded(t) -> bool:
    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every rank calls it in the same order), on the CPU."""
    return (t.full_tensor() if is_sharded(t) else t).detach().cpu()


def gather(state, keep: bool = True):
    """A (nested) state dict with every shard replaced by its whole tensor; every rank must call it. ``keep=False``
    (the ranks that do not write): each whole tensor is dropped as soon as it is gathered (None in its place), so
    only the writing rank ever holds the whole state."""
    if isinstance(state, dict):
        return {k: gather(v, keep) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(gather(v, keep) for v in state)
    if not is_sharded(state):
        return state
    whole = full(state)
    return whole if keep else None


def assign(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- src, slicing a whole tensor into dst's shard when dst is sharded (every rank holds src)."""
    with torch.no_grad():
        if is_sharded(dst):
            from torch.distributed.tensor import distribute_tensor

            src = distribute_tensor(src.to(device=dst.device, dtype=dst.dtype), dst.device_mesh, dst.placements,
                                    src_data_rank=None)
        dst.copy_(src)


def load_module(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``module.load_state_dict(state)`` (strict) for a sharded module and whole tensors."""
    own = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state))[:3], sorted(set(state) - set(own))[:3]
        raise RuntimeError(f"weights do not fit (missing {missing}, unexpected {extra})")
    for k, v in state.items():
        assign(own[k], v)


def load_optimizer(opt, state: dict) -> None:
    """``opt.load_state_dict(state)`` with whole moment tensors sliced to the shards of sharded parameters."""
    params = [p for g in opt.param_groups for p in g["params"]]
    per_param = dict(state["state"])
    for i, p in enumerate(params):
        if i in per_param and is_sharded(p):
            per_param[i] = {k: _shard_like(v, p) for k, v in per_param[i].items()}
    opt.load_state_dict({**state, "state": per_param})


def _shard_like(v, p):
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(p.shape):
        return v  # AdamW's step count
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(v.to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements, src_data_rank=None)


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Total 2-norm of the gradients of sharded and replicated parameters alike (each rank the same value),
    scaled down to ``max_norm`` when larger (max_norm <= 0: only the norm)."""
    squares = torch.zeros((), dtype=torch.float64)
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        n = torch.linalg.vector_norm(g.detach().float())
        squares += (n.full_tensor() if is_sharded(n) else n).cpu().double() ** 2
    norm = squares.sqrt().float()
    if max_norm > 0 and torch.isfinite(norm) and norm > max_norm:
        scale = float(max_norm / (norm + 1e-6))
        for g in grads:
            g.mul_(scale)
    return norm


def check(lora: bool) -> None:
    if lora:
        raise ConfigError("trainer.fsdp=true shards full copies of the generator and critic; with LoRA adapters "
                          "(generator.lora.rank / critic.lora.rank) the trained state is small: use plain data "
                          "parallelism (trainer.fsdp=false)")
