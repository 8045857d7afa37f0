"""Benchmark of the JVP attention (onestep.kernels): ``python tools/bench_kernels.py``.

CPU (always; ``python tools/bench_kernels.py --device cpu --threads 2``): time, peak allocated memory and peak RSS of
the kernel's forward+JVP (the blockwise backend: ``torch.func.jvp(attention)`` and ``fused_forward_jvp``) versus the
MATH path (plain ``softmax(QK^T)V`` + ``torch.func.jvp``), B=1, H=8, d=64, fp32, N in --ns (default 1024, 4096,
8192, 16384).  Every point runs in a fresh subprocess.  Peak allocated is the most bytes torch's CPU allocator
held above its level before the call (profiler memory events), i.e. the attention's own tensors; peak RSS is
the process high-water RSS (VmHWM) minus the RSS right before the timed call (after the inputs were created and a
tiny warm-up call loaded the math libraries).  MATH is not run where its predicted peak (MATH_NN_MATRICES fp32
N x N matrices) does not fit in the available RAM minus MATH_RAM_MARGIN: the row says what it would need.  The
table ends with the issue-20 target (MATH / kernel >= 50x allocated at N = 4096), met or missed.

GPU (only when CUDA is present): TFLOP/s, time and peak memory of the fused Triton forward+JVP
(12 B H N^2 d FLOPs), of ``torch.func.jvp(attention)`` end to end, of SDPA's flash forward
(4 B H N^2 d) and of MATH SDPA + ``torch.func.jvp`` (skipped / "OOM" where it does not fit), for
N = 1k ... 64k, d = 64 / 128, bf16 and fp16.

Writes ``results/jvp_attention_<device>.md`` (device name, versions, date, table) and prints it.

``--transformer``: one sCD training step (objectives/scm.py: teacher velocity, the sCM tangent by
``torch.func.jvp``, the student's forward and the backward of the loss) of a Flux-shaped block stack -- Flux's
real widths (24 heads x 128 = 3072, T5 width 4096, MLP 4x), random weights, ``--double`` double-stream and
``--single`` single-stream blocks instead of 19 + 38 -- behind onestep's Flux adapter, with
``generator.attention`` = each of ``--attentions`` (default: math, jvp_flash); ``--tokens`` IMAGE+TEXT per row
(default 4096+512, Flux at 1024 px, on a GPU; 1024+128 on the CPU). Peak memory and seconds of the step, fp32,
batch 1; CPU points in fresh subprocesses as above. Writes ``results/jvp_transformer_<device>.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time

import torch

import onestep.kernels as ok


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# CPU: one measurement per subprocess
# ------------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    """High-water RSS of this process's address space.

    VmHWM from /proc/self/status (per address space, fresh after exec).  ``getrusage().ru_maxrss``
    is only the fallback: on Linux it survives fork+exec, so a child of a big parent (e.g. pytest)
    would report the parent's high-water mark.
    """
    try:
        with open("/proc/self/status") as f:
            for ln in f:
                if ln.startswith("VmHWM:"):
                    return int(ln.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


#: the methods of the CPU table, in its order: the kernel as networks call it (forward, then the jvp rule's fused
#: pass), the fused pass alone, and the reference
CPU_METHODS = {"blockwise_jvp": "kernel: torch.func.jvp(attention)", "blockwise_fused": "kernel: fused_forward_jvp",
               "math_jvp": "MATH + torch.func.jvp"}
#: fp32 N x N matrices MATH + torch.func.jvp holds at its peak: S, S' and P, P' with a temporary of the softmax's
#: tangent (its allocator peak at N = 1024, H = 8 is 160.0 MiB = 5 x 32 MiB, plus the 4 MiB of O and O')
MATH_NN_MATRICES = 5
#: RAM left to everything else when MATH's predicted peak decides whether it may run (the machine is shared)
MATH_RAM_MARGIN = 4 << 30
#: the issue-20 target: MATH's allocator peak over the kernel's, at this N
TARGET_RATIO, TARGET_N = 50, 4096
CPU_NS = (1024, 4096, 8192, 16384)


def _reset_hwm() -> None:
    """Set VmHWM back to the current RSS (Linux >= 4.0), so the next high-water mark is this call's alone."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _allocator_peak(fn):
    """(fn(), the most bytes the CPU allocator held during fn above its level when fn started).

    torch has no CPU allocator statistics (``torch.cpu`` has no ``max_memory_allocated``); the profiler with
    ``profile_memory=True`` records every allocation and free of the CPU allocator as a signed "[memory]" event,
    and the running sum of those, in time order, is the allocated level.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return out, peak


def _cpu_point(method: str, N: int, B: int, H: int, d: int, threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    shp = (B, H, N, d)
    q, k, v, qd, kd, vd = (torch.randn(shp, generator=g) for _ in range(6))

    def run(q, k, v, qd, kd, vd):
        if method == "math_jvp":
            f = lambda a, b, c: ok.math_attention(a, b, c)  # noqa: E731
        elif method == "blockwise_jvp":
            f = lambda a, b, c: ok.attention(a, b, c, backend="blockwise")  # noqa: E731
        elif method == "blockwise_fused":
            return ok.fused_forward_jvp(q, k, v, qd, kd, vd, backend="blockwise")
        else:
            raise ValueError(method)
        return torch.func.jvp(f, (q, k, v), (qd, kd, vd))

    small = [t[:, :, :64].contiguous() for t in (q, k, v, qd, kd, vd)]
    run(*small)  # warm-up: loads BLAS / threads; tiny transient
    _allocator_peak(lambda: run(*small))  # and the profiler's own first-use setup
    _reset_hwm()
    base = _rss_bytes()
    t0 = time.perf_counter()
    o, od = run(q, k, v, qd, kd, vd)
    dt = time.perf_counter() - t0
    rss_peak = _maxrss_bytes() - base
    assert torch.isfinite(od).all()
    del o, od
    _, alloc_peak = _allocator_peak(lambda: run(q, k, v, qd, kd, vd))  # a second call, not timed
    return {"method": method, "N": N, "time_s": dt, "peak_bytes": max(rss_peak, 0), "alloc_bytes": alloc_peak,
            "threads": torch.get_num_threads()}


def _run_point(spec: dict, timeout: float) -> dict | None:
    """One measurement in a fresh Python process (its own VmHWM); None when it ran out of memory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--point", json.dumps(spec)],
                         capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode != 0:
        if res.returncode in (-9, 137) or "MemoryError" in res.stderr or "DefaultCPUAllocator" in res.stderr:
            return None
        raise RuntimeError(f"bench point {spec} failed:\n{res.stderr[-4000:]}")
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("POINT ")][-1]
    return json.loads(line[len("POINT "):])


def measure_cpu_point(method: str, N: int, B: int = 1, H: int = 8, d: int = 64,
                      threads: int | None = None, timeout: float = 1800) -> dict:
    """Run one CPU measurement in a fresh Python process; returns the dict of :func:`_cpu_point`: time_s (the timed
    call), peak_bytes (its high-water RSS above the RSS before it) and alloc_bytes (the allocator's peak above its
    level before a second, profiled call)."""
    spec = {"method": method, "N": N, "B": B, "H": H, "d": d, "threads": threads}
    point = _run_point(spec, timeout)
    return {"method": method, "N": N, "oom": True} if point is None else point


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for ln in f:
                if ln.startswith("MemAvailable:"):
                    return int(ln.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _fmt_bytes(b: float) -> str:
    for unit, s in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= s:
            return f"{b / s:.1f} {unit}"
    return f"{b:.0f} B"


def run_cpu(ns, B=1, H=8, d=64, threads=None):
    """(header, rows, meta, verdict): one row per (N, method); MATH is not run where its predicted peak does not
    fit in the available RAM minus MATH_RAM_MARGIN."""
    from tqdm import tqdm

    results = {}
    for N, m in tqdm([(N, m) for N in ns for m in CPU_METHODS], desc="cpu bench", unit="pt"):
        nn = B * H * N * N * 4  # one fp32 N x N score matrix
        if m == "math_jvp":
            need, avail = MATH_NN_MATRICES * nn, _mem_available()
            if need > avail - MATH_RAM_MARGIN:
                results[N, m] = {"skip": f"not run: needs ~{_fmt_bytes(need)} ({MATH_NN_MATRICES} x {_fmt_bytes(nn)}"
                                         f"), {_fmt_bytes(avail)} available"}
                continue
        results[N, m] = measure_cpu_point(m, N, B, H, d, threads)

    def ratio(math, r, key):
        return "" if "time_s" not in math or r is math else f"{math[key] / max(r[key], 1):.1f}x"

    rows = []
    for N in ns:
        math = results[N, "math_jvp"]
        for m, label in CPU_METHODS.items():
            r = results[N, m]
            nn = _fmt_bytes(B * H * N * N * 4)
            if "time_s" not in r:
                rows.append([str(N), label, nn, "-", r.get("skip", "OOM (killed)"), "-", "", ""])
                continue
            rows.append([str(N), label, nn, f"{r['time_s']:.2f}", _fmt_bytes(r["alloc_bytes"]),
                         _fmt_bytes(r["peak_bytes"]), ratio(math, r, "alloc_bytes"), ratio(math, r, "peak_bytes")])
    header = ["N", "attention", "one N x N fp32 (B H N^2 4 bytes)", "time (s)", "peak allocated", "peak RSS",
              "MATH / this, allocated", "MATH / this, RSS"]
    threads_used = next((r["threads"] for r in results.values() if "threads" in r), torch.get_num_threads())
    meta = f"B={B}, H={H}, d={d}, fp32, torch threads={threads_used}"
    verdict = None
    if TARGET_N in ns and "time_s" in results[TARGET_N, "math_jvp"]:
        math = results[TARGET_N, "math_jvp"]
        got = {m: math["alloc_bytes"] / max(results[TARGET_N, m]["alloc_bytes"], 1)
               for m in ("blockwise_jvp", "blockwise_fused")}
        met = min(got.values()) >= TARGET_RATIO
        verdict = (f"target (issue 20): MATH / kernel peak allocated >= {TARGET_RATIO}x at N = {TARGET_N}: "
                   f"{got['blockwise_jvp']:.0f}x through torch.func.jvp(attention), {got['blockwise_fused']:.0f}x "
                   f"fused -- {'met' if met else 'MISSED'}")
    return header, rows, meta, verdict


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
def _cuda_time(fn, warmup=2, reps=5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def _cuda_measure(fn):
    """(seconds, peak extra bytes) or ("OOM", "OOM")."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        t = _cuda_time(fn)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM", "OOM"
    return t, peak


def run_gpu(ns, dims=(64, 128), dtypes=("bfloat16", "float16"), tokens=16384, heads=16):
    from tqdm import tqdm
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    rows = []
    configs = [(dt, d, N) for dt in dtypes for d in dims for N in ns]
    for dt_name, d, N in tqdm(configs, desc="gpu bench", unit="cfg"):
        dt = getattr(torch, dt_name)
        B = max(1, tokens // N)
        H = heads
        shp = (B, H, N, d)
        q, k, v, qd, kd, vd = (torch.randn(shp, device="cuda", dtype=dt) for _ in range(6))
        fl_fwd = 4 * B * H * N * N * d
        fl_jvp = 12 * B * H * N * N * d

        def fused():
            return ok.fused_forward_jvp(q, k, v, qd, kd, vd, backend="triton")

        def e2e():
            return torch.func.jvp(lambda a, b, c: ok.attention(a, b, c, backend="triton"), (q, k, v), (qd, kd, vd))

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)

        def math_jvp():
            with sdpa_kernel(SDPBackend.MATH):
                return torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (qd, kd, vd))

        t_f, m_f = _cuda_measure(fused)
        t_e, m_e = _cuda_measure(e2e)
        t_s, m_s = _cuda_measure(flash)
        free, _ = torch.cuda.mem_get_info()
        est = 8 * B * H * N * N * (2 if dt != torch.float32 else 4) + 4 * B * H * N * N * 4
        t_m, m_m = ("OOM", "OOM") if est > 0.9 * free else _cuda_measure(math_jvp)

        def tf(fl, t):
            return "OOM" if t == "OOM" else f"{fl / t / 1e12:.1f}"

        def ms(t):
            return "OOM" if t == "OOM" else f"{t * 1e3:.2f}"

        def mem(m):
            return "OOM" if m == "OOM" else _fmt_bytes(m)

        rows.append([dt_name, str(d), str(N), str(B), tf(fl_jvp, t_f), ms(t_f), mem(m_f), ms(t_e),
                     tf(fl_fwd, t_s), ms(t_s), tf(fl_jvp, t_m), ms(t_m), mem(m_m)])
        del q, k, v, qd, kd, vd
        torch.cuda.empty_cache()
    header = ["dtype", "d", "N", "B", "fused fwd+JVP TFLOP/s", "fused ms", "fused peak",
              "func.jvp(attention) ms", "SDPA flash fwd TFLOP/s", "flash ms",
              "MATH+jvp TFLOP/s (12BHN²d)", "MATH+jvp ms", "MATH+jvp peak"]
    return header, rows, f"H={heads}, B = max(1, {tokens} // N)"


# ------------------------------------------------------------------------------------------------
# Transformer: one sCD step of a Flux-shaped block stack
# ------------------------------------------------------------------------------------------------
#: FLUX.1's widths (diffusers' FluxTransformer2DModel config of black-forest-labs/FLUX.1-dev); only the depth differs
FLUX_WIDTHS = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24,
                   joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=(16, 56, 56))
SIGMA_D = 0.5
#: tokens of the warm-up call (the teacher velocity and the tangent, no backward: loads the math libraries without
#: allocating gradients before the baseline is read)
WARMUP_TOKENS = (16, 8)


def _flux_scd_step(attention: str, image_tokens: int, text_tokens: int, double: int, single: int, device: str):
    """(step, release): ``step(probe)`` runs one sCD generator step, calls ``probe()`` between the tangent (teacher
    call and JVP, no grad) and the student's forward, and returns the loss; ``release()`` drops the gradients. The
    teacher is the student's own weights (sCD's student starts as a copy of the teacher), run under the same
    attention; no optimizer update."""
    from diffusers import FluxTransformer2DModel

    from onestep.conditioning import Cond
    from onestep.denoisers.attention import set_attention
    from onestep.denoisers.flow import FlowTransformerDenoiser
    from onestep.denoisers.trigflow import as_trigflow, velocity
    from onestep.objectives.scm import scm_tangent
    from onestep.schedules import RectifiedFlow

    torch.manual_seed(0)
    net = FluxTransformer2DModel(num_layers=double, num_single_layers=single, **FLUX_WIDTHS).to(device)

    def inputs(n_image, n_text):
        """(student, x_t, t, cond) at n_image packed image tokens and n_text T5 tokens."""
        side = 2 * math.isqrt(n_image)  # Flux packs 2x2 latent patches into one token
        denoiser = set_attention(FlowTransformerDenoiser(net, RectifiedFlow(), "flux", side), attention)
        g = torch.Generator(device).manual_seed(1)
        shape = (1, *denoiser.data_shape)
        x0 = SIGMA_D * torch.randn(shape, generator=g, device=device)
        z = SIGMA_D * torch.randn(shape, generator=g, device=device)
        t = torch.full((1,), 0.8, device=device)
        fields = {"prompt_embeds": torch.randn(1, n_text, net.config.joint_attention_dim, generator=g, device=device),
                  "pooled_prompt_embeds": torch.randn(1, net.config.pooled_projection_dim, generator=g, device=device)}
        return as_trigflow(denoiser, SIGMA_D), torch.cos(t) * x0 + torch.sin(t) * z, t, Cond(fields, fields)

    def tangent(student, x_t, t, cond):
        with torch.no_grad():
            dxdt = velocity(student, x_t, t, cond)
        return scm_tangent(student, x_t, t, dxdt, cond)[:2]

    def run(probe, student, x_t, t, cond):
        v_minus, g = tangent(student, x_t, t, cond)
        probe()
        v = velocity(student, x_t, t, cond)
        loss = ((v - v_minus) / SIGMA_D - g).pow(2).mean()  # sCM eq. (9) without the adaptive weight
        loss.backward()
        return loss.item()

    def release():
        for p in net.parameters():
            p.grad = None

    tangent(*inputs(*WARMUP_TOKENS))
    full = inputs(image_tokens, text_tokens)
    return lambda probe: run(probe, *full), release


def _transformer_point(attention: str, image_tokens: int, text_tokens: int, double: int, single: int,
                       threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    step, _ = _flux_scd_step(attention, image_tokens, text_tokens, double, single, "cpu")
    marks = []
    base = _rss_bytes()
    t0 = time.perf_counter()
    loss = step(lambda: marks.append((time.perf_counter(), _maxrss_bytes())))
    t1 = time.perf_counter()
    return {"attention": attention, "tangent_s": marks[0][0] - t0, "time_s": t1 - t0,
            "tangent_peak": max(marks[0][1] - base, 0), "peak_bytes": max(_maxrss_bytes() - base, 0), "loss": loss,
            "threads": torch.get_num_threads()}


def _cuda_scd_point(attention, image_tokens, text_tokens, double, single, reps=3) -> dict | None:
    """Peaks = torch.cuda.max_memory_allocated above the weights and inputs over one step (after a full-size
    warm-up, which also runs the Triton autotuning); times = means over ``reps`` steps. None when out of memory."""
    torch.cuda.empty_cache()
    marks = []

    def probe():
        torch.cuda.synchronize()
        marks.append((time.perf_counter(), torch.cuda.max_memory_allocated()))

    try:
        step, release = _flux_scd_step(attention, image_tokens, text_tokens, double, single, "cuda")
        step(probe)
        release()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = step(probe)
        peaks = marks[-1][1] - base, torch.cuda.max_memory_allocated() - base
        release()
        marks.clear()
        tangent_s = time_s = 0.0
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(probe)
            torch.cuda.synchronize()
            tangent_s += (marks[-1][0] - t0) / reps
            time_s += (time.perf_counter() - t0) / reps
            release()
    except torch.OutOfMemoryError:
        return None
    return {"attention": attention, "tangent_s": tangent_s, "time_s": time_s, "tangent_peak": peaks[0],
            "peak_bytes": peaks[1], "loss": loss}


def run_transformer(device, tokens, attentions, double, single, threads=None, timeout=1800):
    from tqdm import tqdm

    results = {}
    for (n_img, n_txt), attention in tqdm([(n, a) for n in tokens for a in attentions], desc="sCD step",
                                          unit="pt"):
        if device == "cpu":
            spec = {"kind": "transformer", "attention": attention, "image_tokens": n_img, "text_tokens": n_txt,
                    "double": double, "single": single, "threads": threads}
            results[(n_img, n_txt), attention] = _run_point(spec, timeout)
        else:
            results[(n_img, n_txt), attention] = _cuda_scd_point(attention, n_img, n_txt, double, single)
    rows = []
    for (n_img, n_txt), attention in results:
        r = results[(n_img, n_txt), attention]
        cells = ["OOM"] * 5 if r is None else [
            _fmt_bytes(r["tangent_peak"]), _fmt_bytes(r["peak_bytes"]), f"{r['tangent_s']:.1f}", f"{r['time_s']:.1f}",
            f"{r['loss']:.6g}"]
        rows.append([f"{n_img} + {n_txt}", attention] + cells)
    header = ["image + text tokens", "generator.attention", "peak tangent (teacher + JVP)", "peak step",
              "time tangent (s)", "time step (s)", "loss"]
    threads_used = next((r["threads"] for r in results.values() if r and "threads" in r), torch.get_num_threads())
    n_params = _flux_params(double, single)
    w = FLUX_WIDTHS
    meta = (f"FluxTransformer2DModel, {double} double-stream + {single} single-stream blocks (FLUX.1: 19 + 38) at "
            f"FLUX.1's widths ({w['num_attention_heads']} heads x {w['attention_head_dim']}, T5 "
            f"{w['joint_attention_dim']}, pooled {w['pooled_projection_dim']}, RoPE axes "
            f"{'/'.join(map(str, w['axes_dims_rope']))}), random weights, {n_params / 1e6:.0f}M parameters; batch 1, "
            "fp32"
            + (f", torch threads={threads_used}" if device == "cpu" else ""))
    return header, rows, meta


def _flux_params(double: int, single: int) -> int:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        net = FluxTransformer2DModel(num_layers=double, num_single_layers=single, **FLUX_WIDTHS)
    return sum(p.numel() for p in net.parameters())


# ------------------------------------------------------------------------------------------------
def _table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _versions() -> str:
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "n/a"
    return f"torch {torch.__version__}, triton {tv}, python {platform.python_version()}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _device_name(device: str) -> tuple[str, str]:
    """(name, file tag)."""
    if device == "cpu":
        return _cpu_name(), "cpu"
    name = torch.cuda.get_device_name()
    return name, re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def transformer_report(args, device: str, date: str, argv: list[str]):
    spec = args.tokens or ("1024+128" if device == "cpu" else "4096+512")
    tokens = [tuple(int(n) for n in pair.split("+")) for pair in spec.split(",")]
    for n_image, _ in tokens:
        if math.isqrt(n_image) ** 2 != n_image:  # a square latent of (side / 2)^2 packed 2x2 patches
            raise SystemExit(f"--tokens: {n_image} image tokens is not a square; use e.g. "
                             f"{math.isqrt(n_image) ** 2} or {(math.isqrt(n_image) + 1) ** 2}")
    attentions = args.attentions.split(",")
    header, rows, meta = run_transformer(device, tokens, attentions, args.double, args.single, args.threads)
    name, tag = _device_name(device)
    peak = ("process high-water RSS (VmHWM) minus RSS before the step, one fresh subprocess per point (after a "
            f"{WARMUP_TOKENS[0]} + {WARMUP_TOKENS[1]} token warm-up of the teacher call and the tangent)"
            if device == "cpu" else "torch.cuda.max_memory_allocated above the weights and inputs (after a full-size "
                                     "warm-up step); times are means of 3 steps")
    command = " ".join(["python", "tools/bench_kernels.py", *argv])
    md = "\n".join([
        "# One sCD training step of a Flux-shaped block stack: generator.attention " + " vs ".join(attentions), "",
        f"- command: `{command}`",
        f"- device: {name}", f"- versions: {_versions()}", f"- date: {date}", f"- config: {meta}",
        "- step: the teacher's velocity (no grad; the student's own weights) and the sCM tangent (`scm_tangent`: "
        "`torch.func.jvp` of the TrigFlow velocity, no grad) -- the 'tangent' columns, measured up to there -- then "
        "the student's velocity with grad and the backward of ||(v - v-) / sigma_d - g||^2 (sCM eq. (9) without the "
        "adaptive weight) into every parameter; no optimizer update. The same seed gives the same loss under every "
        "attention.",
        f"- peak: {peak}. 'peak step' includes the parameter gradients (4 bytes x parameters) under every "
        "attention; 'peak tangent' is reached before any gradient exists.",
        "", _table(header, rows), "",
    ])
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"jvp_transformer_{tag}.md")
    with open(path, "w") as f:
        f.write(md)
    print(md)
    print(f"written to {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--ns", default=None, help="comma-separated sequence lengths")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out-dir", default=os.path.join(REPO_ROOT, "results"))
    ap.add_argument("--transformer", action="store_true",
                    help="one sCD step of a Flux-shaped block stack instead of the attention call alone")
    ap.add_argument("--tokens", default=None,
                    help="--transformer: comma-separated IMAGE+TEXT token counts (default 4096+512 on cuda, 1024+128 "
                         "on cpu); IMAGE must be a square")
    ap.add_argument("--double", type=int, default=1, help="--transformer: double-stream blocks (FLUX.1: 19)")
    ap.add_argument("--single", type=int, default=1, help="--transformer: single-stream blocks (FLUX.1: 38)")
    ap.add_argument("--attentions", default="math,jvp_flash",
                    help="--transformer: generator.attention options to compare (default | math | jvp_flash)")
    ap.add_argument("--note", default=None, help="a line added to the results file (e.g. that the machine was shared)")
    ap.add_argument("--point", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.point:
        p = json.loads(args.point)
        if p.get("kind") == "transformer":
            point = _transformer_point(p["attention"], p["image_tokens"], p["text_tokens"], p["double"], p["single"],
                                       p["threads"])
        else:
            point = _cpu_point(p["method"], p["N"], p["B"], p["H"], p["d"], p["threads"])
        print("POINT " + json.dumps(point))
        return

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    load = os.getloadavg()
    if args.transformer:
        return transformer_report(args, device, date, sys.argv[1:] if argv is None else list(argv))
    verdict = None
    if device == "cpu":
        ns = [int(x) for x in (args.ns or ",".join(map(str, CPU_NS))).split(",")]
        header, rows, meta, verdict = run_cpu(ns, threads=args.threads)
        title = "Forward + JVP attention on CPU: blockwise kernel vs MATH + torch.func.jvp"
        note = ("One fresh subprocess per row. Time: one call, after a tiny warm-up. Peak allocated: the most bytes "
                "torch's CPU allocator held above its level before a second call (profiler memory events; torch has "
                "no CPU allocator statistics) -- the attention's own tensors, O and O' included. Peak RSS: the "
                "process high-water RSS (VmHWM, reset before the call) minus the RSS before the timed call -- adds "
                "what glibc keeps and what BLAS allocates outside torch. Kernel = the blockwise PyTorch backend "
                "(the CPU path; Triton runs on CPU only under TRITON_INTERPRET=1): torch.func.jvp(attention) runs "
                "its forward, then the jvp rule's fused forward+JVP pass; fused_forward_jvp runs that pass alone. "
                f"MATH runs only where {MATH_NN_MATRICES} fp32 N x N matrices (its measured peak) fit in the "
                f"available RAM minus {_fmt_bytes(MATH_RAM_MARGIN)}.")
    else:
        ns = [int(x) for x in (args.ns or "1024,2048,4096,8192,16384,32768,65536").split(",")]
        header, rows, meta = run_gpu(ns)
        title = "Forward + JVP attention on GPU: Triton kernel vs SDPA flash forward and MATH + jvp"
        note = ("TFLOP/s: fused fwd+JVP and MATH+jvp counted as 12 B H N^2 d, SDPA forward as "
                "4 B H N^2 d. Peak = torch.cuda.max_memory_allocated above the inputs.")
    name, tag = _device_name(device)
    md = "\n".join([
        f"# {title}", "",
        f"- command: `{' '.join(['python', 'tools/bench_kernels.py', *(sys.argv[1:] if argv is None else argv)])}`",
        f"- device: {name}", f"- versions: {_versions()}", f"- date: {date}", f"- config: {meta}",
        f"- {note}", *([f"- load average (1 min) before / after: {load[0]:.2f} / {os.getloadavg()[0]:.2f} on "
                       f"{os.cpu_count()} cores"] if device == "cpu" else []),
        *([f"- {args.note}"] if args.note else []),
        "", _table(header, rows), "", *([f"**{verdict}**", ""] if verdict else []),
    ])
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"jvp_attention_{tag}.md")
    with open(path, "w") as f:
        f.write(md)
    print(md)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
