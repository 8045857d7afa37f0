"""One prepared GPU check (issue 31): everything only a GPU can show, in one command, in under 8 minutes.

    python tools/gpu_check.py                         # on a CUDA machine: writes results/gpu_check.md + .json
    python tools/gpu_check.py --parts 1,2 --budget-scale 0.5
    python tools/gpu_check.py --dry-run --out /tmp/gc # every part at toy sizes on the CPU (CI keeps it from rotting)

Parts, in this order, each in its own subprocess with its own time budget (a part that overruns is killed, its rows
so far kept and the cut reported; the run goes on), the results files rewritten after every part:

1. kernel correctness: onestep.kernels' Triton forward + JVP + backward against a float64 MATH reference on the same
   device, fp32 / bf16 / fp16, head dim 64 / 128, N in {128, 1024, 4096}, with and without a tangent of K and V;
2. kernel speed: SDPA's flash forward vs the kernel's forward, its fused forward + JVP, and MATH + torch.func.jvp, bf16,
   d = 128, 24 heads: ms, TFLOP/s (JVP attention counted as 3x the forward's 4 B H N^2 d) and peak memory;
3. SD1.5- and SDXL-size DMD2 training steps through `onestep train` (random weights, UNets built from the published
   configs): peak memory and s/step for LoRA vs full fine-tune, bf16 vs fp32 frozen base, gradient checkpointing,
   batch 1 vs 4, xformers vs SDPA and trainer.compile;
4. one sCD step of a Flux-width transformer at 4096 + 512 tokens and of a Wan-width one at 7800 video tokens (5 latent
   frames, 3D rotary positions) + 512 text tokens, generator.attention math vs jvp_flash, bf16;
5. the trainer's overhead on the GPU: `onestep train` vs a bare loop doing the same math, steps/s.

Diffusers and hydra-core are imported inside the parts that need them: where one is missing (the lent GPU machine has
neither unless their wheels travel with the checkout) the part writes a "skipped: <module> not installed" row.
--dry-run runs the same code at toy sizes on the CPU: the Triton parts under TRITON_INTERPRET=1 (set in the part's
subprocess before triton is imported) at one tiny fp32 shape (the interpreter's bf16 tl.dot is broken), peak memory
from the process's RSS high-water mark instead of the CUDA allocator.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[1:1] = [str(ROOT / "tools"), str(ROOT / "tests")]  # bench_memory, bench_trainer; sd_fixtures


def _package(name: str, folder: Path) -> None:
    """Import ``folder`` as the package ``name`` (its submodules are then found through its __path__)."""
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[name])


if importlib.util.find_spec("onestep") is None:
    # a plain checkout (the lent GPU machine has no install): the packages as pyproject.toml maps them (configs/
    # installs as onestep.configs), without putting the repository's top level on sys.path
    _package("onestep", ROOT / "onestep")
    _package("onestep.configs", ROOT / "configs")


# ---------------------------------------------------------------------------------------------------------------
# budgets and sizes
# ---------------------------------------------------------------------------------------------------------------
#: seconds per part on one H100. Their sum (470 s) stays under the 8-minute ceiling; each part's content is sized to
#: end inside it (estimates beside each part), so the budget cuts only what is slower than expected, last rows first
BUDGETS = {1: 80, 2: 90, 3: 210, 4: 40, 5: 50}
#: the dry run's budgets: generous next to its measured ~1 minute on 2 shared cores
DRY_BUDGETS = {1: 60, 2: 40, 3: 120, 4: 40, 5: 60}
TITLES = {1: "Kernel correctness (Triton fwd + JVP + bwd vs float64 MATH)",
          2: "Kernel speed (SDPA flash forward, the kernel's forward and fused forward + JVP, MATH + jvp)",
          3: "SD1.5 / SDXL-size DMD2 training steps",
          4: "sCD step of a Flux-width and a Wan-width transformer",
          5: "Trainer overhead (onestep train vs a bare loop)"}
#: max |kernel - reference| / max |reference| allowed per dtype (over O, O', dQ, dK, dV): fp32 dots run in IEEE
#: precision; bf16 / fp16 round P to the input dtype before P V (8 / 11 mantissa bits) and accumulate in fp32
TOLERANCES = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2}


# ---------------------------------------------------------------------------------------------------------------
# measurement: time and peak memory on either device
# ---------------------------------------------------------------------------------------------------------------
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _vm_hwm() -> int:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM"))
    return int(line.split()[1]) * 1024


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peak:
    """Peak memory above the level at reset(): torch.cuda.max_memory_allocated on CUDA; on the CPU (dry run) the
    process's RSS high-water mark (VmHWM, which clear_refs 5 sets back to the current RSS)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.base = 0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _rss()

    def gib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**30
        return max(_vm_hwm() - self.base, 0) / 2**30


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _timed(fn, device, reps: int) -> float:
    """Median seconds of ``reps`` calls (after the caller's warm-up), each synchronised."""
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _missing(e: ModuleNotFoundError, case: str = "all") -> dict:
    return {"case": case, "status": f"skipped: {e.name} not installed"}


# ---------------------------------------------------------------------------------------------------------------
# part 1: kernel correctness
# ---------------------------------------------------------------------------------------------------------------
def part_correctness(dry: bool, device: str):
    """On CUDA: 3 dtypes x 2 head dims x 3 N x 2 tangent forms = 36 cases at B = 1, H = 4; the float64 reference at
    N = 4096 holds ~5 N x N float64 matrices per head (2.7 GB for the 4 heads). Most of the ~60 s is Triton compiling
    and autotuning each (dtype, d, tangent) variant once. Dry run: fp32, d = 16, N = 32 (two of the interpreter's
    16-row blocks)."""
    import onestep.kernels as ok

    if dry:
        grid = [("float32", 16, 32)]
        B, H = 1, 1
    else:  # bf16 first: the dtype the speed part and the transformer use
        grid = [(dt, d, n) for dt in ("bfloat16", "float16", "float32") for d in (128, 64) for n in (128, 1024, 4096)]
        B, H = 1, 4
    for dt_name, d, n in grid:
        for kv_tangent in (True, False):
            yield _correctness_case(ok, getattr(torch, dt_name), d, n, B, H, kv_tangent, device)


def _correctness_case(ok, dtype, d, n, B, H, kv_tangent, device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(n + d)
    # inputs drawn in float64 and rounded to the dtype once; the reference reads the rounded values, so only the
    # kernel's arithmetic is measured
    q, k, v, tq, tk, tv, do = (torch.randn(B, H, n, d, generator=g, dtype=torch.float64).to(device, dtype)
                               for _ in range(7))
    if not kv_tangent:
        tk, tv = torch.zeros_like(tk), torch.zeros_like(tv)

    def kernel(a, b, c):
        return ok.attention(a, b, c, backend="triton")

    if kv_tangent:
        o, o_t = torch.func.jvp(kernel, (q, k, v), (tq, tk, tv))
    else:  # K and V constants: the jvp rule receives no tangent for them (the kernel's zero-tangent path)
        o, o_t = torch.func.jvp(lambda a: kernel(a, k, v), (q,), (tq,))
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    kernel(qg, kg, vg).backward(do)

    ref = [t.double() for t in (q, k, v)]
    with torch.no_grad():
        ro, ro_t = torch.func.jvp(ok.math_attention, tuple(ref), tuple(t.double() for t in (tq, tk, tv)))
    rq, rk, rv = (t.requires_grad_(True) for t in ref)
    ok.math_attention(rq, rk, rv).backward(do.double())

    errors = {}  # output -> (max abs error, that over max |reference|)
    for name, got, want in (("O", o, ro), ("O'", o_t, ro_t), ("dQ", qg.grad, rq.grad), ("dK", kg.grad, rk.grad),
                            ("dV", vg.grad, rv.grad)):
        err = (got.double() - want).abs().max().item()
        rel = err / max(want.abs().max().item(), 1e-300)
        errors[name] = (err, rel if math.isfinite(rel) else math.inf)  # a NaN output is the worst error
    worst = max(errors, key=lambda k: errors[k][1])
    name = str(dtype).removeprefix("torch.")
    tol = TOLERANCES[name]
    return {"case": f"{name} d={d} N={n} {'tangents q, k, v' if kv_tangent else 'tangent q only'}",
            "status": "ok" if errors[worst][1] <= tol else "FAIL",
            "max abs err": max(e for e, _ in errors.values()), "max rel err": errors[worst][1], "worst output": worst,
            "tolerance (rel)": tol}


# ---------------------------------------------------------------------------------------------------------------
# part 2: kernel speed
# ---------------------------------------------------------------------------------------------------------------
def part_speed(dry: bool, device: str):
    """bf16, d = 128, 24 heads. B = 16 up to N = 4096, then B x N held at 65536 tokens, so the cost grows only
    linearly in N: the fused fwd + JVP at N = 65536 is 1.6e14 FLOPs (~1 s); Triton's autotuning of its 6 configurations
    there (~7 calls each) is most of the part's ~70 s, which is why N = 65536 comes last.
    MATH + jvp runs only where its N x N matrices fit (estimated as 8 in bf16 and 4 in fp32 per head: the scores, the
    probabilities, their tangents and the softmax's temporaries). Dry run: fp32, d = 16, 2 heads, N = 32, the CPU's
    SDPA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import onestep.kernels as ok

    F = torch.nn.functional
    if dry:
        dtype, d, H, points, reps = torch.float32, 16, 2, [(32, 1)], 1
    else:
        dtype, d, H, reps = torch.bfloat16, 128, 24, 3
        points = [(n, 16 if n <= 4096 else 16 * 4096 // n) for n in (1024, 4096, 16384, 65536)]
    peak = Peak(device)
    for n, B in points:
        q, k, v, qd, kd, vd = (torch.randn(B, H, n, d, device=device, dtype=dtype) for _ in range(6))
        fwd_flops = 4 * B * H * n * n * d
        methods = {
            "SDPA flash forward": (lambda: _flash(F, sdpa_kernel, SDPBackend, q, k, v), fwd_flops),
            "kernel forward": (lambda: _no_grad(ok.attention, q, k, v, backend="triton"), fwd_flops),
            "kernel fused forward + JVP": (lambda: ok.fused_forward_jvp(q, k, v, qd, kd, vd, backend="triton"),
                                           3 * fwd_flops),
            "MATH + torch.func.jvp": (lambda: _math_jvp(F, sdpa_kernel, SDPBackend, q, k, v, qd, kd, vd),
                                      3 * fwd_flops),
        }
        for label, (fn, flops) in methods.items():
            row = {"case": f"{str(dtype).removeprefix('torch.')} d={d} H={H} N={n} B={B}: {label}", "N": n,
                   "B": B}
            if label.startswith("MATH") and device == "cuda":
                need = B * H * n * n * (8 * q.element_size() + 4 * 4)
                if need > 0.9 * torch.cuda.mem_get_info()[0]:
                    yield row | {"status": f"skipped: needs ~{need / 2**30:.0f} GiB of N x N matrices"}
                    continue
            try:
                _free_memory()
                peak.reset()
                fn()  # warm-up: Triton compiles and autotunes here (with buffers of its own: not in the peak)
                _free_memory()
                peak.reset()
                fn()
                mem = peak.gib()
                sec = _timed(fn, device, reps)
            except torch.OutOfMemoryError:
                _free_memory()
                yield row | {"status": "OOM"}
                continue
            yield row | {"status": "ok", "ms": sec * 1e3, "TFLOP/s": flops / sec / 1e12, "peak GiB": mem}
        del q, k, v, qd, kd, vd


def _no_grad(fn, *args, **kw):
    with torch.no_grad():
        return fn(*args, **kw)


def _flash(F, sdpa_kernel, SDPBackend, q, k, v):
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.no_grad():
        return F.scaled_dot_product_attention(q, k, v)


def _math_jvp(F, sdpa_kernel, SDPBackend, q, k, v, qd, kd, vd):
    with sdpa_kernel([SDPBackend.MATH]), torch.no_grad():
        return torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (qd, kd, vd))


# ---------------------------------------------------------------------------------------------------------------
# part 3: SD1.5 / SDXL training steps
# ---------------------------------------------------------------------------------------------------------------
#: runwayml/stable-diffusion-v1-5 unet/config.json: diffusers' UNet2DConditionModel defaults (block_out_channels
#: 320/640/1280/1280, 3 CrossAttnDownBlock2D + DownBlock2D, attention_head_dim 8, layers_per_block 2, 32 groups) but
#: for these two keys
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768}
#: SDXL's text encoders: CLIP ViT-L (768) and OpenCLIP ViT-bigG (1280, pooled and projected to 1280) --
#: stabilityai/stable-diffusion-xl-base-1.0 text_encoder{,_2}/config.json; one layer each here (they only encode
#: prompts, before the timed steps)
SDXL_TEXT = (768, 1280)
#: toy UNets of the dry run (the shapes of tests/sd_fixtures.py) and their text widths
TOY_UNET = {"sample_size": 8, "block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
            "attention_head_dim": 8, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32}
#: (64 bottleneck channels: the GAN head's last GroupNorm then has 2 channels a group, which batch 1 needs at 1x1)
TOY_SDXL = TOY_UNET | {"block_out_channels": (32, 64), "addition_embed_type": "text_time",
                       "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 16}
LORA = ["generator.lora.rank={r}", "critic.lora.rank={r}"]
#: (model, label, batch, overrides). objective.ttur=1 throughout: a step is one critic and one generator update.
#: On an H100 an SD1.5 row is ~15 s (loading the pipeline, 10 steps), an SDXL row ~30 s, the two random pipeline
#: folders ~20 s: ~190 s in all, the optional rows last so that a slow machine cuts those first
SD_ROWS = [
    ("sd15", "LoRA-{r}, bf16 frozen", 1, [*LORA, "trainer.frozen_dtype=bf16", "trainer.gradient_checkpointing=false"]),
    ("sd15", "LoRA-{r}, bf16 frozen", 4, [*LORA, "trainer.frozen_dtype=bf16", "trainer.gradient_checkpointing=false"]),
    ("sd15", "LoRA-{r}, bf16 frozen, grad ckpt", 4, [*LORA, "trainer.frozen_dtype=bf16",
                                                    "trainer.gradient_checkpointing=true"]),
    ("sd15", "LoRA-{r}, fp32 frozen", 1, [*LORA, "trainer.frozen_dtype=fp32", "trainer.gradient_checkpointing=false"]),
    ("sd15", "full, bf16 frozen", 1, ["trainer.frozen_dtype=bf16", "trainer.gradient_checkpointing=false"]),
    ("sd15", "full, fp32 frozen", 1, ["trainer.frozen_dtype=fp32", "trainer.gradient_checkpointing=false"]),
    ("sd15", "full, bf16 frozen, grad ckpt", 4, ["trainer.frozen_dtype=bf16", "trainer.gradient_checkpointing=true"]),
    ("sdxl", "LoRA-{r}, bf16 frozen, grad ckpt (sdxl_dmd2_4step as shipped)", 1, LORA),
    ("sdxl", "LoRA-{r}, bf16 frozen, grad ckpt (sdxl_dmd2_4step as shipped)", 4, LORA),
    # the other rows run xformers wherever the header lists it (the Networks switch to it on CUDA when it imports)
    ("sd15", "LoRA-{r}, bf16 frozen, PyTorch SDPA (xformers blocked)", 1,
     [*LORA, "trainer.frozen_dtype=bf16", "trainer.gradient_checkpointing=false"]),
    # mode default: max-autotune (what compile_mode=auto picks on CUDA) tunes every GEMM for minutes, past the budget
    ("sd15", "LoRA-{r}, bf16 frozen, trainer.compile (mode default)", 1,
     [*LORA, "trainer.frozen_dtype=bf16", "trainer.gradient_checkpointing=false", "trainer.compile=true",
      "trainer.compile_mode=default"]),
]
EXPERIMENTS = {"sd15": "sd15_dmd2", "sdxl": "sdxl_dmd2_4step"}


def part_sd(dry: bool, device: str):
    try:
        import diffusers  # noqa: F401
        import hydra  # noqa: F401
    except ModuleNotFoundError as e:
        yield _missing(e)
        return
    from bench_memory import SDXL_UNET

    cuda = device == "cuda"
    work = Path(tempfile.mkdtemp(prefix="gpu_check_sd_"))
    # 512 / 1024 px as shipped (64 / 128 latents through an 8x VAE); the dry run: 64 px, 8x8 latents
    res = {"sd15": 64, "sdxl": 64} if dry else {"sd15": 512, "sdxl": 1024}
    unets = {"sd15": TOY_UNET, "sdxl": TOY_SDXL} if dry else {"sd15": SD15_UNET, "sdxl": SDXL_UNET}
    rank, steps = (4, 4) if dry else (64, 10)
    folders, params = {}, {}
    for i, (model, label, batch, overrides) in enumerate(SD_ROWS):
        row = {"case": f"{model.upper()} {res[model]} px, {label.format(r=rank)}, batch {batch}"}
        if "xformers" in label and cuda and importlib.util.find_spec("xformers") is None:
            yield row | {"status": "skipped: xformers not installed (every row ran PyTorch SDPA)"}
            continue
        if "compile" in label and dry:
            yield row | {"status": "skipped in --dry-run: compiling three UNets takes minutes on 2 CPU cores"}
            continue
        try:
            if model not in folders:
                folders[model], params[model] = _sd_folder(work / model, model, unets[model], res[model], dry, device)
            ov = [f"experiment={EXPERIMENTS[model]}", f"teacher.path={folders[model]}",
                  f"data.path={folders[model] / ('images' if model == 'sdxl' else 'prompts.txt')}",
                  f"teacher.resolution={res[model]}", "objective.ttur=1",
                  f"trainer.batch_size={batch}", "trainer.checkpoint_every=1000", "trainer.sample_every=0",
                  "trainer.progress=false", "trainer.log_with=none", "eval.num_samples=1", "eval.teacher_steps=[1]",
                  "eval.plot=false", f"out_root={work}", f"run_dir={work / 'runs' / str(i)}",
                  *(o.format(r=rank) for o in overrides), *(["trainer.mixed_precision=bf16"] if cuda else [])]
            with _xformers_blocked("xformers" in label):
                result = row | _train_row(ov, device, steps) | {"UNet params (M)": params[model] / 1e6}
        except torch.OutOfMemoryError:
            result = row | {"status": "OOM"}
        except ModuleNotFoundError as e:  # a package the lent machine lacks (its wheels did not travel)
            result = row | _missing(e)
        except Exception as e:  # noqa: BLE001 - independent runs: one that breaks is reported, the others still run
            traceback.print_exc()
            first = (str(e).splitlines() or [""])[0][:200]
            result = row | {"status": f"error: {type(e).__name__}: {first}"}
        finally:
            _free_memory()
            torch._dynamo.reset()
        yield result
    shutil.rmtree(work, ignore_errors=True)  # the SDXL folder alone is 5 GB


def _sd_folder(folder: Path, model: str, unet_config: dict, res: int, dry: bool, device: str) -> tuple[Path, int]:
    """A pipeline folder with the random full-size UNet (saved in fp16: half the disk traffic; the trainer loads it
    as fp32), a 4-level 8x VAE of 8 channels and one-layer CLIP text encoders of the real widths (they only encode
    prompts and decode the final sample), a prompt file and 4 captioned images at ``res`` px."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sd_fixtures import MAX_TOKENS, TOKENS, scheduler, tokenizer, write_captioned_images, write_prompts

    torch.manual_seed(0)
    with torch.device(device):  # the init of 2.6B random weights is seconds on a GPU, a minute on one CPU core
        unet = UNet2DConditionModel(**unet_config)
    n_params = sum(p.numel() for p in unet.parameters())
    unet = unet.to("cpu", torch.float32 if dry else torch.float16)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, sample_size=res)

    def text(width: int, projection: bool = False):
        config = CLIPTextConfig(hidden_size=width, num_hidden_layers=1, num_attention_heads=max(1, width // 64),
                                intermediate_size=width, max_position_embeddings=MAX_TOKENS, vocab_size=len(TOKENS),
                                projection_dim=width, bos_token_id=len(TOKENS) - 2, eos_token_id=len(TOKENS) - 1,
                                pad_token_id=len(TOKENS) - 1)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

    if model == "sd15":
        pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text(unet_config["cross_attention_dim"]),
                                       tokenizer=tokenizer(folder / "tokenizer"), scheduler=scheduler(),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        widths = (16, 16) if dry else SDXL_TEXT
        pipe = StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=text(widths[0]),
                                         text_encoder_2=text(widths[1], projection=True),
                                         tokenizer=tokenizer(folder / "tokenizer"),
                                         tokenizer_2=tokenizer(folder / "tokenizer_2"), scheduler=scheduler())
    pipe.save_pretrained(str(folder), safe_serialization=True)
    prompts = ["a photo of a cat", "a red car on a road", "an oil painting of a harbour", "a bowl of fruit"]
    write_prompts(folder / "prompts.txt", prompts)
    write_captioned_images(folder / "images", prompts, size=(res, res))
    return folder, n_params


@contextmanager
def _xformers_blocked(block: bool):
    """While ``block``, `import xformers.ops` fails, so the Networks keep PyTorch SDPA (they switch to xformers
    whenever it imports on CUDA)."""
    saved = {k: sys.modules[k] for k in ("xformers", "xformers.ops") if k in sys.modules}
    if block:
        sys.modules["xformers.ops"] = None
    try:
        yield
    finally:
        if block:
            sys.modules.pop("xformers.ops", None)
            sys.modules.update(saved)


class _Measured(Exception):
    """Raised by the step callback after the last timed step: train() stops there, before its final checkpoint and
    evaluation (for a full SD1.5 fine-tune ~20 GB of weights and Adam moments to disk), which this check does not
    measure."""


def _train_row(overrides: list[str], device: str, steps: int) -> dict:
    """`onestep train` with a step callback: s/step = the median duration of steps 3..``steps``, peak memory over the
    same steps (after step 2, the first steps' allocation and compilation behind)."""
    from hydra import compose, initialize_config_module

    import onestep.config  # noqa: F401  (registers the schemas)
    from onestep.train.trainer import train

    with initialize_config_module("onestep.configs", version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"trainer.steps={steps + 1}"])
    peak = Peak(device)
    marks = {}

    def mark(step, logs):
        _sync(device)
        marks[step] = time.perf_counter()
        if step == 2:
            peak.reset()
        if step == steps:
            marks["peak"] = peak.gib()
            raise _Measured

    try:
        train(cfg, cfg.run_dir, callbacks=(mark,))
    except _Measured:
        pass
    durations = [marks[s] - marks[s - 1] for s in range(3, steps + 1)]
    return {"status": "ok", "peak GiB": marks["peak"], "s/step": statistics.median(durations)}


# ---------------------------------------------------------------------------------------------------------------
# part 4: sCD on a Flux-width and a Wan-width transformer
# ---------------------------------------------------------------------------------------------------------------
#: black-forest-labs/FLUX.1-dev transformer/config.json: every width; 1 double- + 1 single-stream block instead of
#: 19 + 38 (the attention's share of memory and time is per block, so one of each shows the difference)
FLUX_WIDTHS = {"patch_size": 1, "in_channels": 64, "attention_head_dim": 128, "num_attention_heads": 24,
               "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
               "axes_dims_rope": (16, 56, 56)}
TOY_FLUX = {"patch_size": 1, "in_channels": 16, "attention_head_dim": 16, "num_attention_heads": 2,
            "joint_attention_dim": 32, "pooled_projection_dim": 16, "guidance_embeds": True,
            "axes_dims_rope": (4, 6, 6)}
#: Wan 2.1 T2V 1.3B (Wan-Video/Wan2.1 wan/configs/wan_t2v_1_3B.py: dim 1536 = 12 heads x 128, ffn 8960, freq 256,
#: q/k norms, cross-attention norm, eps 1e-6; umT5 text width 4096): every width, 1 block instead of 30
WAN_WIDTHS = {"patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
              "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "cross_attn_norm": True,
              "qk_norm": "rms_norm_across_heads", "eps": 1e-6}
#: head dim 12: each rotary axis (frame, row, column) gets 4 channels
TOY_WAN = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4,
           "out_channels": 4, "text_dim": 32, "freq_dim": 16, "ffn_dim": 32, "cross_attn_norm": True}
#: (C, F, h, w) latents of 17 frames at 480 x 832 (the VAE's 4x temporal and 8x spatial strides): 5 x 30 x 52 = 7800
#: video tokens after 2x2 patches, attended with 3D rotary positions, + Wan's 512 text tokens in the cross-attention
WAN_LATENTS, TOY_WAN_LATENTS = (16, 5, 60, 104), (4, 2, 4, 4)
SIGMA_D = 0.5


def _flux_student(dry: bool, device: str, dtype):
    """(case, network, TrigFlow student, prompt fields) of Flux: 4096 image tokens (64 x 64 latents) + 512 text."""
    from diffusers import FluxTransformer2DModel

    from onestep.denoisers.flow import FlowTransformerDenoiser
    from onestep.schedules import RectifiedFlow

    widths, (n_img, n_txt) = (TOY_FLUX, (16, 8)) if dry else (FLUX_WIDTHS, (4096, 512))
    with torch.device(device):  # random init on the GPU: seconds instead of a minute on one CPU core
        net = FluxTransformer2DModel(num_layers=1, num_single_layers=1, **widths).to(dtype)
    side = 2 * math.isqrt(n_img)  # Flux packs 2x2 latent patches into one token
    g = torch.Generator(device).manual_seed(1)
    fields = {"prompt_embeds": torch.randn(1, n_txt, widths["joint_attention_dim"], generator=g, device=device),
              "pooled_prompt_embeds": torch.randn(1, widths["pooled_projection_dim"], generator=g, device=device)}
    return f"Flux, {n_img} + {n_txt} tokens", net, FlowTransformerDenoiser(net, RectifiedFlow(), "flux", side), fields


def _wan_student(dry: bool, device: str, dtype):
    """(case, network, TrigFlow student, prompt fields) of Wan: 5 x 30 x 52 video tokens + 512 text tokens."""
    from diffusers import WanTransformer3DModel

    from onestep.denoisers.wan import WanDenoiser
    from onestep.schedules import RectifiedFlow

    widths, latents, n_txt = (TOY_WAN, TOY_WAN_LATENTS, 8) if dry else (WAN_WIDTHS, WAN_LATENTS, 512)
    with torch.device(device):
        net = WanTransformer3DModel(num_layers=1, **widths).to(dtype)
    p_t, p_h, p_w = widths["patch_size"]
    frames, rows, cols = latents[1] // p_t, latents[2] // p_h, latents[3] // p_w
    g = torch.Generator(device).manual_seed(1)
    fields = {"prompt_embeds": torch.randn(1, n_txt, widths["text_dim"], generator=g, device=device)}
    return (f"Wan, {frames} x {rows} x {cols} + {n_txt} tokens", net,
            WanDenoiser(net, RectifiedFlow(), latents), fields)


def part_scd(dry: bool, device: str):
    """One warm-up and 3 timed steps per attention and model: ~10 s each for Flux on an H100 (MATH holds 24 x 4608^2
    scores per layer, ~1 GB bf16), a few seconds each for Wan (12 x 7800^2 scores, ~1.5 GB bf16). Dry run: 2 heads,
    16 + 8 (Flux) and 8 + 8 (Wan) tokens."""
    try:
        import diffusers  # noqa: F401

        import hydra  # noqa: F401  (onestep.objectives registers its configs with hydra)
        from onestep.conditioning import Cond
        from onestep.denoisers.attention import set_attention
        from onestep.denoisers.trigflow import as_trigflow, velocity
        from onestep.objectives.scm import scm_tangent
    except ModuleNotFoundError as e:
        yield _missing(e)
        return
    reps = 1 if dry else 3
    dtype = torch.float32 if dry else torch.bfloat16
    for build in (_flux_student, _wan_student):
        for attention in ("math", "jvp_flash"):
            torch.manual_seed(0)
            name, net, denoiser, fields = build(dry, device, dtype)
            row = {"case": f"{name}, {str(dtype).removeprefix('torch.')}, generator.attention={attention}"}
            student = as_trigflow(set_attention(denoiser, attention), SIGMA_D)
            g = torch.Generator(device).manual_seed(2)
            shape = (1, *student.data_shape)
            x0, z = (SIGMA_D * torch.randn(shape, generator=g, device=device) for _ in range(2))
            t = torch.full((1,), 0.8, device=device)
            x_t = torch.cos(t) * x0 + torch.sin(t) * z
            cond = Cond(fields, fields)

            def step():
                """sCD: the teacher's velocity (the student's own weights, as at the start of sCD), the sCM tangent
                by torch.func.jvp, the student's velocity with grad and the backward of sCM eq. (9) without its
                weight."""
                with torch.no_grad():
                    dxdt = velocity(student, x_t, t, cond)
                v_minus, tangent = scm_tangent(student, x_t, t, dxdt, cond)[:2]
                loss = ((velocity(student, x_t, t, cond) - v_minus) / SIGMA_D - tangent).pow(2).mean()
                loss.backward()
                net.zero_grad(set_to_none=True)
                return loss.item()

            peak = Peak(device)
            try:
                step()  # warm-up (Triton autotuning)
                _free_memory()
                peak.reset()
                loss = step()
                mem = peak.gib()
                sec = _timed(step, device, reps)
            except torch.OutOfMemoryError:
                yield row | {"status": "OOM"}
            else:
                yield row | {"status": "ok", "s/step": sec, "peak GiB": mem, "loss": loss,
                             "params (M)": sum(p.numel() for p in net.parameters()) / 1e6}
            del net, denoiser, student
            _free_memory()


# ---------------------------------------------------------------------------------------------------------------
# part 5: trainer overhead
# ---------------------------------------------------------------------------------------------------------------
#: case -> steps timed (GPU, dry run); ~10 s per side on an H100, the DMD regression pairs built once per case
OVERHEAD_CASES = {"gmm_dmd2": (200, 20), "digits_dmd2": (40, 4)}
#: the dry run's cuts of what both cases build before their first step: 64 regression pairs of 4 teacher steps
#: instead of 2048 of 32 (~70 CPU-s for digits), and gmm's teacher net trained for 50 DSM steps instead of 1000
DRY_SETUP = {"gmm_dmd2": ["objective.regression_pairs=64", "objective.regression_steps=4", "teacher.net_steps=50"],
             "digits_dmd2": ["objective.regression_pairs=64", "objective.regression_steps=4"]}


def part_overhead(dry: bool, device: str):
    try:
        import bench_trainer
    except ModuleNotFoundError as e:
        yield _missing(e)
        return
    root = Path(tempfile.mkdtemp(prefix="gpu_check_trainer_"))
    for case, (gpu_steps, dry_steps) in OVERHEAD_CASES.items():
        steps = dry_steps if dry else gpu_steps
        overrides = [f"experiment={case}", f"objective.pairs_file={root / case}_pairs.safetensors",
                     *(DRY_SETUP[case] if dry else [])]
        run = root / case
        try:
            fw, _ = bench_trainer.framework(overrides, steps, run)
            bare = bench_trainer.bare(overrides, steps, run, device)
        except ModuleNotFoundError as e:  # e.g. scikit-learn, whose digits the digits case trains on
            yield _missing(e, case)
            continue
        yield {"case": case, "status": "ok", "steps timed": steps, "onestep train (steps/s)": fw,
               "bare loop (steps/s)": bare, "ratio": fw / bare}
    shutil.rmtree(root, ignore_errors=True)


PARTS = {1: part_correctness, 2: part_speed, 3: part_sd, 4: part_scd, 5: part_overhead}


# ---------------------------------------------------------------------------------------------------------------
# the driver: one subprocess per part, results rewritten after each
# ---------------------------------------------------------------------------------------------------------------
def child(part: int, rows_file: Path, dry: bool) -> None:
    device = "cpu" if dry else "cuda"
    with rows_file.open("a") as f:
        for row in PARTS[part](dry, device):
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(f"[part {part}] " + ", ".join(f"{k}={_cell(v)}" for k, v in row.items()), flush=True)


def run_part(part: int, budget: float, dry: bool, work: Path) -> dict:
    rows_file, log = work / f"part{part}.jsonl", work / f"part{part}.log"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if dry and part in (1, 2):  # read when triton_jvp is imported (kernel decoration): set before the process starts
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(part), "--rows-file", str(rows_file)]
    t0 = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(cmd + (["--dry-run"] if dry else []), env=env, stderr=err, start_new_session=True)
        try:
            code = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part's own process group: it and anything it started
            proc.wait()
            code = None
    seconds = time.perf_counter() - t0
    rows = _read_rows(rows_file)
    if code is None:
        status = f"cut: over its {budget:.0f} s budget after {len(rows)} rows"
    elif code != 0:
        tail = [ln for ln in log.read_text().splitlines() if ln.strip()][-1:] or ["(no output)"]
        status = f"crashed (exit code {code}): {tail[0][:300]}"
        print(log.read_text()[-4000:], file=sys.stderr)
    elif not rows:
        status = "crashed: no rows"
    elif _failed(rows):
        status = "ok, with failures"
    else:
        status = "ok"
    return {"part": part, "title": TITLES[part], "status": status, "seconds": round(seconds, 1),
            "budget_s": round(budget), "rows": rows}


def _read_rows(path: Path) -> list[dict]:
    """The rows a part wrote; a last line cut short by the kill of a part over its budget is dropped."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def _failed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] != "ok" and not r["status"].startswith("skipped")]


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def header(command: str, dry: bool) -> dict:
    def version(name):
        try:
            return __import__(name).__version__
        except Exception:  # noqa: BLE001 - missing, or broken for this torch: either way not in use
            return "not installed"

    cuda = torch.cuda.is_available() and not dry
    return {"command": command,
            "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
            "mode": "dry run: toy sizes on the CPU, no GPU figures" if dry else "full",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": f"torch {torch.__version__}, triton {version('triton')}, CUDA {torch.version.cuda}, "
                        f"python {platform.python_version()}, diffusers {version('diffusers')}, "
                        f"xformers {version('xformers')}"}


def write(out: Path, head: dict, parts: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"header": head, "parts": parts}, indent=1) + "\n")
    lines = ["# GPU check", "", *(f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in head.items()), ""]
    for p in parts:
        lines += [f"## Part {p['part']}: {p['title']}", "",
                  f"{p['status']} ({p['seconds']:.0f} s of a {p['budget_s']} s budget)", ""]
        failed = _failed(p["rows"])
        if failed:
            lines += [f"**failed:** {r['case']}: {r['status']}" for r in failed] + [""]
        cols = list(dict.fromkeys(k for r in p["rows"] for k in r))
        if p["rows"]:
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in p["rows"]]
            lines.append("")
    (out / "gpu_check.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="every part at toy sizes on the CPU")
    ap.add_argument("--parts", default="1,2,3,4,5", help="comma-separated parts to run, in order (default all)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    ap.add_argument("--out", default=None, help="folder of gpu_check.md/.json (default results/; a temporary "
                                                "folder under --dry-run)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rows-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.rows_file, args.dry_run)
        return 0
    try:
        parts = [int(p) for p in args.parts.split(",")]
    except ValueError:
        parts = []
    if not parts or any(p not in PARTS for p in parts):
        ap.error(f"--parts {args.parts!r}: give part numbers from {sorted(PARTS)}, e.g. --parts 1,2")
    if args.budget_scale <= 0:
        ap.error(f"--budget-scale {args.budget_scale}: must be > 0")
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device here: run it on a GPU machine, or pass --dry-run for the toy-size CPU check")
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="gpu_check_dry_")) if args.dry_run
                                           else ROOT / "results")
    command = shlex.join(["python", "tools/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    head = header(command, args.dry_run)
    budgets = DRY_BUDGETS if args.dry_run else BUDGETS
    done = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_parts_") as work:
        for p in parts:
            print(f"== part {p}: {TITLES[p]} (budget {budgets[p] * args.budget_scale:.0f} s)", flush=True)
            done.append(run_part(p, budgets[p] * args.budget_scale, args.dry_run, Path(work)))
            print(f"== part {p}: {done[-1]['status']} in {done[-1]['seconds']:.0f} s", flush=True)
            write(out, head, done)
    for p in done:  # what needs looking at, last on the screen
        if p["status"] != "ok":
            print(f"part {p['part']}: {p['status']}")
        for r in _failed(p["rows"]):
            print(f"part {p['part']}: {r['case']}: {r['status']}")
    print(f"wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'}")
    return 0 if all(p["status"] == "ok" for p in done) else 1


if __name__ == "__main__":
    sys.exit(main())
