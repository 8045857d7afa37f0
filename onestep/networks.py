"""Every network of a run, in one place (DESIGN.md, "Networks and conditioning").

Roles
  teacher     the frozen real score, cast to ``trainer.frozen_dtype`` (the trainer wraps it with CFG)
  generator   trained: a full copy of the student init, or a LoRA adapter (``generator.lora.rank``)
  critic      trained, for objectives with a fake score: a full copy, or a LoRA adapter (``critic.lora.rank``)
  heads       extra trained modules an objective builds (GAN / log-variance heads), each optimized with the
              generator or the critic update
  targets     non-optimized copies of the generator, moved by ``update_targets`` after every generator step:
              ``generator_ema`` (trainer.ema_decay; decay 0 is the generator itself, not a copy) and those the
              objective asks for (a consistency EMA target)

With LoRA, teacher, generator, critic and targets are *views* of ONE frozen base network: each view switches
its own adapter on for the duration of its forward pass (the teacher's view switches all off), so the base
exists once in memory, is never optimized and stays bit-identical; only adapter weights are trained and
checkpointed.

Objectives see the roles through ``nets()`` (a core.Nets) and never unwrap anything. Under several processes
the gradients of each role are averaged across ranks before clipping (``reduce_gradients``): the DDP
reduction, done here because roles that share one base cannot each sit in their own DDP wrapper.
Evaluation and export load a trained generator with ``load_generator`` (no trainer involved).
"""

from __future__ import annotations

import copy
import re
import warnings
import contextlib
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn

from onestep import checkpoint, fsdp
from onestep.core import Nets
from onestep.denoisers.attention import use_memory_efficient_attention
from onestep.denoisers.base import Denoiser
from onestep.denoisers.slim import parse_arch
from onestep.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: LoRA targets of diffusers models when ``lora.target_modules`` is not given: the attention projections
#: (the diffusers LCM-LoRA / DreamBooth-LoRA training scripts' default set)
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
EMA = "generator_ema"


def frozen_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"trainer.frozen_dtype '{name}' is unknown; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_lora(lc, key: str) -> None:
    if lc.rank is not None and lc.rank <= 0:
        raise ConfigError(f"{key}.lora.rank={lc.rank} must be a positive adapter rank (or null to train the full "
                          "network)")
    if lc.alpha is not None and lc.alpha <= 0:
        raise ConfigError(f"{key}.lora.alpha={lc.alpha} must be > 0 (or null for alpha = rank)")


def check_networks(cfg) -> None:
    """The Networks keys, checked before any slow setup."""
    frozen_dtype(cfg.trainer.frozen_dtype)
    check_lora(cfg.generator.lora, "generator")
    check_lora(cfg.critic.lora, "critic")
    if cfg.generator.arch:
        parse_arch(cfg.generator.arch)  # a malformed spec or a missing .json fails before any teacher loads
    if cfg.generator.arch and cfg.generator.lora.rank is not None:
        raise ConfigError(f"generator.arch='{cfg.generator.arch}' gives the generator a network of its own, and "
                          "generator.lora.rank puts adapters on the teacher's: drop one of them")


# --- LoRA adapters on a shared base ---------------------------------------------------------------------------

def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _default_targets(model: nn.Module) -> list[str]:
    from onestep.denoisers.attention import has_diffusers_attention

    if has_diffusers_attention(model):
        return list(ATTENTION_TARGETS)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError(f"{type(model).__name__} has neither attention nor Linear layers for LoRA; set "
                          "generator.lora.target_modules / critic.lora.target_modules or train the full network")
    return names


class SharedBase:
    """One frozen network carrying named LoRA adapters; ``use(name)`` runs a forward pass with only that adapter
    on (None: the base alone). peft's own ``set_adapter`` also flips ``requires_grad``, which would freeze an
    adapter whose graph is still waiting for its backward pass, so the switch sets the layers' state directly."""

    def __init__(self, net: Denoiser):
        self.net = net
        self.layers: list[nn.Module] = []
        self.default_targets: list[str] | None = None  # found before the first injection adds Linear layers
        self.trainable: dict[str, bool] = {}  # adapter name -> optimized (generator, critic) or not (targets)
        self.active: str | None = None  # the adapter of the forward pass in progress

    def add(self, name: str, lc, like: str | None = None, trainable: bool = True) -> list[str]:
        """Inject adapter ``name`` (rank, alpha, targets from ``lc``); initialized as a copy of ``like`` if given,
        else peft's init (B = 0: the adapted net starts equal to the base). Returns its parameter names."""
        from peft import LoraConfig, inject_adapter_in_model

        if self.default_targets is None:
            self.default_targets = _default_targets(self.net)
        targets = list(lc.target_modules) if lc.target_modules else self.default_targets
        config = LoraConfig(r=lc.rank, lora_alpha=lc.alpha or lc.rank, target_modules=targets, lora_dropout=0.0)
        try:
            with warnings.catch_warnings():  # "multiple adapters in the model": that is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(config, self.net, adapter_name=name)
        except ValueError as e:
            raise ConfigError(f"LoRA target_modules {targets} do not match {type(self.net).__name__} "
                              f"({str(e).splitlines()[0][:160]}); set *.lora.target_modules") from None
        self.layers = _tuner_layers(self.net)
        for m in self.layers:  # off until a view switches it on
            m._disable_adapters, m._active_adapter = True, []
        # peft freezes the other adapters on every injection; set each adapter's requires_grad again
        self.trainable[name] = trainable
        params = dict(self.net.named_parameters())
        for adapter, on in self.trainable.items():
            for n in self.param_names(adapter):
                params[n].requires_grad_(on)
        names = self.param_names(name)
        if like is not None:
            with torch.no_grad():
                for n in names:
                    params[n].copy_(params[_rename(n, name, like)])
        return names

    def param_names(self, name: str) -> list[str]:
        pat = re.compile(rf"\.lora_\w+\.{re.escape(name)}\.")
        return [n for n, _ in self.net.named_parameters() if pat.search(n)]

    @contextmanager
    def use(self, name: str | None):
        saved = [(m._disable_adapters, m._active_adapter) for m in self.layers]
        previous, self.active = self.active, name
        for m in self.layers:
            m._disable_adapters, m._active_adapter = name is None, ([] if name is None else [name])
        try:
            yield
        finally:
            self.active = previous
            for m, (d, a) in zip(self.layers, saved):
                m._disable_adapters, m._active_adapter = d, a



def _rename(param_name: str, src: str, dst: str) -> str:
    return re.sub(rf"(\.lora_\w+\.){re.escape(src)}\.", rf"\g<1>{dst}.", param_name)


class View(Denoiser):
    """A Denoiser that runs ``net`` (in its own dtype) with one adapter of a SharedBase active. Its
    ``parameters()`` are the role's own (an adapter's, or all of a full copy's), so ``frozen(view)`` and device
    lookups see exactly the role; the native prediction is cast back to the caller's dtype, and conversions to
    x0 / eps / score happen at the caller's precision."""

    def __init__(self, net: Denoiser, base: SharedBase | None = None, adapter: str | None = None,
                 own: list[str] | None = None):
        super().__init__()
        self.net, self.adapter = net, adapter
        self._base = [base]  # a list: not a submodule of its own
        self._own = own  # parameter names of the role (None = all of net's)
        # the Denoiser interface has class-level defaults, which __getattr__ would never be asked for
        self.schedule, self.prediction = net.schedule, net.prediction
        self.data_shape, self.num_classes = net.data_shape, net.num_classes
        self.conditional, self.embedded_guidance = net.conditional, net.embedded_guidance

    conditional = False  # set per instance in __init__ (shadows Denoiser.conditional)

    def __getattr__(self, name: str):
        """Every other public data attribute of the wrapped network (feature_dim, a routed generator's num_students
        or phase_ts, ...), whatever shaped it. Methods and submodules are not passed: run through the view, they would
        skip its adapter and dtype (the view defines the entry points it runs: forward, features, ...)."""
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules of the view itself
        except AttributeError:
            net = self.__dict__.get("_modules", {}).get("net")
            if net is None or name.startswith("_"):  # private state (torch's, accelerate's flags) stays the view's
                raise
            value = getattr(net, name)
            if callable(value):
                raise AttributeError(f"{type(self).__name__} passes data attributes of its network through, not "
                                     f"'{name}': call it on the network itself (Networks.unwrapped)") from None
            return value

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        own = None if self._own is None else set(self._own)
        for n, p in self.net.named_parameters(prefix="", recurse=recurse, remove_duplicate=remove_duplicate):
            if own is None or n in own:
                yield (f"{prefix}.{n}" if prefix else n), p

    @contextmanager
    def _active(self):
        base = self._base[0]
        if base is None:
            yield
        else:
            with base.use(self.adapter):
                yield

    def _dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.net.parameters() if p.is_floating_point()), torch.float32)

    def _call(self, fn, x_t, t, cond):
        dtype = self._dtype()
        if dtype == x_t.dtype or not dtype.is_floating_point:
            with self._active():
                return fn(x_t, t, cond)
        # a low-precision frozen net: its matmuls / convs run in its dtype under autocast, while x_t and t stay
        # at the caller's precision (a bf16 t would move an SD timestep by several table entries)
        with self._active(), torch.autocast(x_t.device.type, dtype=dtype):
            return fn(x_t, t, cond).to(x_t.dtype)

    def forward(self, x_t, t, cond=None):
        return self._call(self.net, x_t, t, cond)

    def features(self, x_t, t, cond=None):
        if not hasattr(self.net, "features"):
            raise ConfigError(f"objective.discriminator needs a network with features(x_t, t, cond); "
                              f"{type(self.net).__name__} has none (use objective.discriminator=none)")
        return self._call(self.net.features, x_t, t, cond)

    def spatial_features(self, x_t, t, cond=None):
        if not hasattr(self.net, "spatial_features"):
            raise ConfigError(f"objective.gan_head needs a network with spatial features (an image UNet's bottleneck); "
                              f"{type(self.net).__name__} has none (use objective.gan_head=mlp_pool)")
        return self._call(self.net.spatial_features, x_t, t, cond)


# --- roles ----------------------------------------------------------------------------------------------------

class Role:
    """A trained or target network: its view, the parameters optimized / checkpointed, and its state."""

    def __init__(self, view: View, module: nn.Module, names: list[str] | None):
        self.view, self.module, self.names = view, module, names  # names None: every parameter and buffer

    def parameters(self) -> list[nn.Parameter]:
        return list(self.view.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.names is None:
            return self.module.state_dict()
        params = dict(self.module.named_parameters())
        return {n: params[n] for n in self.names}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        if self.names is None and any(fsdp.is_sharded(p) for p in self.module.parameters()):
            fsdp.load_module(self.module, sd)
            return
        if self.names is None:
            self.module.load_state_dict(sd)
            return
        if set(sd) != set(self.names):
            missing, extra = sorted(set(self.names) - set(sd))[:3], sorted(set(sd) - set(self.names))[:3]
            raise RuntimeError(f"adapter weights do not fit (missing {missing}, unexpected {extra})")
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for n, v in sd.items():
                params[n].copy_(v)

    @torch.no_grad()
    def lerp_from(self, source: "Role", decay: float) -> None:
        """self <- decay * self + (1 - decay) * source (parameters; buffers copied): the EMA / target update."""
        for p_t, p in zip(self.view.parameters(), source.view.parameters()):
            p = p.detach().full_tensor() if fsdp.is_sharded(p) else p.detach()  # a replicated copy of FSDP shards
            p_t.lerp_(p.to(p_t.dtype), 1 - decay)
        if self.names is None:
            for b_t, b in zip(self.module.buffers(), source.module.buffers()):
                b_t.copy_(b)


def _full_role(net: Denoiser, trainable: bool) -> Role:
    net = copy.deepcopy(net).to(torch.float32)
    net.requires_grad_(trainable).train(trainable)
    return Role(View(net), net, None)


def _adapter_role(base: SharedBase, name: str, lc, like: str | None = None) -> Role:
    names = base.add(name, lc, like, trainable=like is None)
    return Role(View(base.net, base, name, names), base.net, names)


def checkpointing_func(base: SharedBase | None):
    """diffusers' gradient-checkpointing hook. A block is recomputed during backward, long after its forward
    returned: by then another view may have switched adapters, and ``objectives.base.frozen`` has restored the
    ``requires_grad`` it lowered for a pass *through* the critic. The recomputation must repeat the forward
    exactly, so it runs with the adapter and the parameters' requires_grad of that forward."""
    def checkpointed(block, *args):
        name = None if base is None else base.active
        params = list(block.parameters())
        flags = [p.requires_grad for p in params]

        def run(*a):
            now = [p.requires_grad for p in params]
            for p, f in zip(params, flags):
                p.requires_grad_(f)
            try:
                if base is None:
                    return block(*a)
                with base.use(name):
                    return block(*a)
            finally:
                for p, f in zip(params, now):
                    p.requires_grad_(f)
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)
    return checkpointed


def _set_gradient_checkpointing(net: nn.Module, func=None) -> bool:
    found = False
    for m in net.modules():
        if hasattr(m, "enable_gradient_checkpointing") and getattr(m, "_supports_gradient_checkpointing", False):
            m.enable_gradient_checkpointing(func)
            found = True
    return found


class Networks:
    """Builds the roles of one run from the experiment Setup and the config (see the module docstring)."""

    def __init__(self, cfg, setup, *, critic: bool, heads: dict[str, tuple[nn.Module, str]] | None = None,
                 targets: dict[str, float] | None = None, device=None, shape=None, shard: bool = False):
        """``shard``: FSDP2 for the generator and critic when there are several processes (onestep/fsdp.py).
        The config's keys were checked by validate.check_config (``check_networks`` among them) before the run
        started; what is checked here can only be known once the networks are built."""
        gl, cl = cfg.generator.lora, cfg.critic.lora
        tc = cfg.trainer
        dtype = DTYPES[tc.frozen_dtype]
        shape = shape or (lambda net: net)
        device = torch.device("cpu") if device is None else device
        self.device = device
        self.heads = dict(heads or {})
        self.decays = {EMA: tc.ema_decay, **(targets or {})}
        for name, (_, role) in self.heads.items():  # what an objective's build_modules returned
            if role not in ("generator", "critic"):
                raise ValueError(f"module '{name}' has role '{role}', not generator|critic")

        lora = gl.rank is not None or (critic and cl.rank is not None)
        teacher, init = setup.teacher, setup.student_init
        # generator.arch: the generator (and its targets) from a network of its own; the critic stays teacher-shaped
        generator_init = setup.generator_start
        self.base: SharedBase | None = None
        if lora:
            # the student init becomes the shared frozen base (for text-to-image teachers it IS the teacher)
            net = shape(init).requires_grad_(False).eval().to(device=device, dtype=dtype)
            self.base = SharedBase(net)

        def trained(name: str, lc, start: Denoiser) -> Role:
            if lc.rank is not None:
                return _adapter_role(self.base, name, lc)
            return _full_role(shape(start), trainable=True)  # copied in fp32 before the teacher is cast

        self.roles: dict[str, Role] = {"generator": trained("generator", gl, generator_init)}
        if critic:
            self.roles["critic"] = trained("critic", cl, init)
        for name in self.decays:
            if name == EMA and self.decays[name] == 0:
                self.roles[name] = self.roles["generator"]  # decay 0 is the generator itself: no copy
            elif gl.rank is not None:
                self.roles[name] = _adapter_role(self.base, name, gl, like="generator")
            else:
                g = self.roles["generator"].module
                tgt = copy.deepcopy(g).requires_grad_(False).eval()
                self.roles[name] = Role(View(tgt), tgt, None)
        shared = self.base is not None and teacher is init  # (shape() may have wrapped init; its modules are shared)
        if not shared:  # (the shared base was frozen and cast before its adapters were added)
            teacher = teacher.requires_grad_(False).eval().to(device=device, dtype=dtype)
        self.teacher = View(teacher, self.base, None) if shared else View(teacher)
        # frozen and plain forward passes: xformers when available; JVP generators keep onestep.kernels' processors
        # (on a shared base, the teacher's too)
        if cfg.generator.attention == "default":
            for m in {id(r.module): r.module for r in self.roles.values()}.values():
                use_memory_efficient_attention(m, device)
        if shared and cfg.generator.attention != "default":
            self.attention = f"onestep.kernels ({cfg.generator.attention}) in the shared base"
        else:
            self.attention = use_memory_efficient_attention(teacher, device)
        for role in self.roles.values():
            role.module.to(device)
        for m, _ in self.heads.values():
            m.to(device).requires_grad_(True).train()
        if tc.gradient_checkpointing:  # whether a built network supports it
            nets = {id(r.module): r.module for k, r in self.roles.items() if k in ("generator", "critic")}.values()
            func = checkpointing_func(self.base)
            if not any([_set_gradient_checkpointing(n, func) for n in nets]):
                raise ConfigError("trainer.gradient_checkpointing=true but no network of this run supports it "
                                  "(only diffusers models do); set trainer.gradient_checkpointing=false")
        self.sharded = shard and fsdp.world_size() > 1
        self.teacher_sharded = False
        self.compiled: list[str] | None = None  # the names compile() compiled (None: not asked to)
        if self.sharded:  # after the targets were copied from the generator: they stay replicated
            fsdp.check(lora)  # (FSDP may come from the launch config, and shards only under several processes)
            for name in ("generator", "critic"):
                if name in self.roles:
                    fsdp.shard(self.roles[name].module, tc.mixed_precision)
            self.teacher_sharded = fsdp.shard(teacher)  # (FSDP excludes LoRA: the teacher is never a shared base)

    @contextmanager
    def whole(self, *roles: str):
        """Context in which the networks of ``roles`` ("teacher", a role name) may run on one process alone
        (objective.prepare's teacher pairs, evaluation and sample grids of the EMA role, which with
        trainer.ema_decay=0 is the sharded generator itself). Sharded ones are gathered by every rank on entry, so
        every rank must enter, with the same roles."""
        with contextlib.ExitStack() as stack:
            for name in roles:
                net = self.teacher.net if name == "teacher" else self.roles[name].module
                if self.sharded:
                    stack.enter_context(fsdp.whole(net))
            yield

    def compile(self, mode: str, eager: tuple[str, ...] = ()) -> list[str]:
        """torch.compile every network of the run in place (``nn.Module.compile``: state-dict keys, checkpoints and
        export are unchanged) but those of the roles in ``eager`` — the objective's torch.func.jvp networks, whose
        forward-mode AD (through onestep.kernels' attention functions) is kept out of dynamo. Roles that share one
        module (a LoRA base, the EMA at decay 0) share the decision. ``mode``: auto = max-autotune on CUDA, the
        default mode elsewhere. Returns the compiled names."""
        if mode == "auto":
            mode = "max-autotune" if self.device.type == "cuda" else "default"
        by_module: dict[int, tuple[nn.Module, list[str]]] = {}
        shared = self.teacher._base[0] is not None  # the teacher runs through the LoRA roles' shared base
        pairs = [(n, r.module) for n, r in self.roles.items()]
        pairs.append(("teacher", self.base.net if shared else self.teacher.net))
        for name, module in pairs:
            by_module.setdefault(id(module), (module, []))[1].append(name)
        done = []
        for module, names in by_module.values():
            if any(n in eager for n in names):
                continue
            module.compile(mode=mode)
            done += names
        self.compiled = done
        return done

    # --- what the trainer and objectives use --------------------------------------------------------------

    def params(self, role: str) -> list[nn.Parameter]:
        """The optimized parameters of one update: the role's network plus the heads trained with it."""
        own = self.roles[role].parameters() if role in self.roles else []
        return own + [p for m, r in self.heads.values() if r == role for p in m.parameters()]

    def nets(self, teacher: Denoiser) -> Nets:
        """The objective's view; ``teacher`` is the (guided) teacher view."""
        return Nets(teacher=teacher, generator=self.roles["generator"].view,
                    critic=self.roles["critic"].view if "critic" in self.roles else None,
                    modules={n: m for n, (m, _) in self.heads.items()},
                    targets={n: self.roles[n].view for n in self.decays if n != EMA})

    def update_targets(self) -> None:
        for name, decay in self.decays.items():
            if self.roles[name] is not self.roles["generator"]:
                self.roles[name].lerp_from(self.roles["generator"], decay)

    def reduce_gradients(self, role: str) -> None:
        """Average the gradients of one update across processes (no-op with one process)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        params = [p for p in self.params(role) if not fsdp.is_sharded(p)]  # FSDP reduce-scatters its own
        if not params:
            return
        # one all-reduce of [gradients..., has-gradient flags]: a parameter without a gradient on this rank adds
        # zeros, and keeps none (the optimizer skips it, as one process would) only when no rank has one
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in params]
                         + [torch.tensor([p.grad is not None for p in params], dtype=torch.float32,
                                         device=params[0].device)])
        dist.all_reduce(flat)
        offset, world = 0, dist.get_world_size()
        for p, has in zip(params, flat[-len(params):].tolist()):
            if has:
                g = (flat[offset:offset + p.numel()] / world).view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.copy_(g)
            offset += p.numel()

    def sync_gradients(self, role: str, sync: bool) -> None:
        """Whether the next backward of ``role`` reduce-scatters its FSDP shards' gradients (``sync``) or keeps them
        local to add the next micro-batch's (gradient accumulation); replicated gradients wait for
        ``reduce_gradients`` either way. A no-op unless sharded."""
        if self.sharded and role in self.roles:
            fsdp.sync_gradients(self.roles[role].module, sync)

    def checkpointed(self, gathered: bool = True, keep: bool = True) -> dict:
        """name -> object with state_dict / load_state_dict: every role but the teacher, and the heads. Sharded
        roles are gathered here (``gathered``: what writing whole tensors needs; loading slices whole tensors into
        the shards either way), so every rank must call it (the main process then writes; the others pass
        ``keep=False`` and hold no whole tensor)."""
        objs = {**self.roles, **{n: m for n, (m, _) in self.heads.items()}}
        return {n: _Gathered(o, keep) for n, o in objs.items()} if self.sharded and gathered else objs

    def live(self, optimizers: dict[str, torch.optim.Optimizer]) -> checkpoint.Live:
        """The checkpointed networks as they are held (FSDP shards or whole) with the optimizers of their updates
        (role -> optimizer): what a dcp checkpoint is written from and read into. Full roles only (a LoRA run's
        small adapters are written as safetensors: validate.py)."""
        modules = {**{n: r.module for n, r in self.roles.items()}, **{n: m for n, (m, _) in self.heads.items()}}
        owners = {}
        for role, opt in optimizers.items():  # a module over every parameter the optimizer steps: the role's + heads'
            # (an objective without a critic network, e.g. the pure adversarial one, steps only its heads as "critic")
            own = {role: self.roles[role].module} if role in self.roles else {}
            owners[f"opt_{role}"] = (nn.ModuleDict({**own, **{n: m for n, (m, r) in self.heads.items() if r == role}}),
                                     opt)
        return checkpoint.Live(modules, owners)

    def describe(self) -> str:
        """One line per role: how it is held and how many parameters it trains (printed at the start of a run)."""
        def count(ps):
            return sum(p.numel() for p in ps)
        base = "" if self.base is None else f", shared base {count(self.base.net.parameters()) / 1e6:.2f}M params"
        teacher = f"networks: teacher {self.teacher._dtype()}".replace("torch.", "")
        if self.teacher_sharded:
            local = sum(p.to_local().numel() for p in self.teacher.parameters()) / 1e6
            teacher += f" FSDP2-sharded over {fsdp.world_size()} processes ({local:.3f}M params per process)"
        lines = [teacher + base + f"; attention: {self.attention}"]
        if self.compiled is not None:
            lines.append(f"  torch.compile: {', '.join(self.compiled) or 'none'} (eager: the rest)")
        for name, role in self.roles.items():
            if name != "generator" and role is self.roles["generator"]:
                lines.append(f"  {name}: the generator itself (decay 0)")
                continue
            how = f"LoRA adapter '{role.view.adapter}'" if role.names is not None else "full copy"
            params = role.parameters()
            if any(fsdp.is_sharded(p) for p in params):
                local = sum(p.to_local().numel() for p in params) / 1e6
                how += f" FSDP2-sharded over {fsdp.world_size()} processes ({local:.3f}M params per process)"
            lines.append(f"  {name}: {how}, {count(params) / 1e6:.3f}M params")
        for name, (m, r) in self.heads.items():
            lines.append(f"  {name}: head trained with the {r}, {count(m.parameters()) / 1e6:.3f}M params")
        return "\n".join(lines)

    def unwrapped(self, role: str = EMA) -> Denoiser:
        """The plain Denoiser of a role, for evaluation and export."""
        return self.roles[role].view


class _Gathered:
    """A role's whole state, gathered from its FSDP shards by every rank; loading slices it back."""

    def __init__(self, obj, keep: bool = True):
        self.obj, self.state = obj, fsdp.gather(obj.state_dict(), keep)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.obj.load_state_dict(sd)


def load_generator(cfg, setup, run_dir: str | Path, role: str = EMA, device=None, shape=None,
                   upto: int | None = None) -> tuple[Denoiser, int]:
    """The trained generator (EMA by default) of a run folder's newest readable checkpoint (of step <= ``upto``, if
    given), built through the same roles as training: (denoiser, step). A missing / unfitting checkpoint is a
    ConfigError."""
    nets = Networks(cfg, setup, critic=False, device=device, shape=shape,
                    targets={})
    try:
        state = checkpoint.load_latest(run_dir, {role: nets.roles[role]}, upto)
    except RuntimeError as e:  # weights that do not fit the architecture the config builds
        raise ConfigError(f"'{run_dir}': {role} does not fit the run's config ({str(e).splitlines()[0]})") from None
    if state is None:
        raise ConfigError(f"'{run_dir}' has no readable checkpoint with {role}.safetensors; train it further")
    view = nets.unwrapped(role)
    view.net.eval()
    return view, int(state["step"])
