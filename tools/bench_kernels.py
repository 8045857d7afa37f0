"""Benchmark of the JVP attention (onestep.kernels): ``python tools/bench_kernels.py``.

CPU (always; ``python tools/bench_kernels.py --device cpu --threads 2``): time, peak allocated memory and peak RSS of
the kernel's forward+JVP (the blockwise backend: ``torch.func.jvp(attention)`` and ``fused_forward_jvp``) versus the
MATH path (plain ``softmax(QK^T)V`` + ``torch.func.jvp``), B=1, H=8, d=64, fp32, N in --ns (default 1024, 4096,
8192, 16384).  Every point runs in a fresh subprocess.  Peak allocated is the most bytes torch's CPU allocator
held above its level before the call (profiler memory events), i.e. the attention's own tensors; peak RSS is
the process high-water RSS (VmHWM) minus the RSS right before the timed call (after the inputs were created and a
tiny warm-up call loaded the math libraries).  MATH is not run where its predicted peak (MATH_NN_MATRICES fp32
N x N matrices) does not fit in the available RAM minus MATH_RAM_MARGIN: the row says what it would need.  The
table ends with the kernel's target (MATH / kernel >= 50x allocated at N = 4096), met or missed.

GPU (only when CUDA is present): TFLOP/s, time and peak memory of the fused Triton forward+JVP
(12 B H N^2 d FLOPs), of ``torch.func.jvp(attention)`` end to end, of SDPA's flash forward
(4 B H N^2 d) and of MATH SDPA + ``torch.func.jvp`` (skipped / "OOM" where it does not fit), for
N = 1k ... 64k, d = 64 / 128, bf16 and fp16.

Writes the measurements to ``results/jvp_attention_<device>.json`` (device name, versions, date, one record per row)
and the markdown rendered from that JSON alone to ``results/jvp_attention_<device>.md``, prints it and refreshes its
blocks on the README and docs pages.

``--transformer``: one sCD training step (objectives/scm.py: teacher velocity, the sCM tangent by
``torch.func.jvp``, the student's forward and the backward of the loss) of a Flux-shaped block stack -- Flux's
real widths (24 heads x 128 = 3072, T5 width 4096, MLP 4x), random weights, ``--double`` double-stream and
``--single`` single-stream blocks instead of 19 + 38 -- behind onestep's Flux adapter, with
``generator.attention`` = each of ``--attentions`` (default: math, jvp_flash); ``--tokens`` IMAGE+TEXT per row
(default 4096+512, Flux at 1024 px, on a GPU; 1024+128 on the CPU). Peak memory and seconds of the step, fp32,
batch 1; CPU points in fresh subprocesses as above. Writes ``results/jvp_transformer_<device>.{json,md}``.

``python tools/bench_kernels.py render`` rewrites every ``results/jvp_*.md`` from its JSON, running nothing.
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
from pathlib import Path

import torch

import onestep.kernels as ok


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = Path(REPO_ROOT) / "results"


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
#: the kernel's target: MATH's allocator peak over the kernel's, at this N
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


def run_cpu(ns, B=1, H=8, d=64, threads=None) -> tuple[list[dict], int]:
    """(rows, torch threads used): one record per (N, method) in the table's order -- the measurement of
    :func:`measure_cpu_point` (time_s, alloc_bytes, peak_bytes; oom when killed) with, on the kernel's rows where MATH
    ran, MATH's peaks over the kernel's (math_over_alloc, math_over_rss), or for a MATH whose predicted peak does not
    fit in the available RAM minus MATH_RAM_MARGIN the bytes available then (not_run_available_bytes)."""
    from tqdm import tqdm

    results = {}
    for N, m in tqdm([(N, m) for N in ns for m in CPU_METHODS], desc="cpu bench", unit="pt"):
        if m == "math_jvp":
            avail = _mem_available()
            if MATH_NN_MATRICES * B * H * N * N * 4 > avail - MATH_RAM_MARGIN:
                results[N, m] = {"method": m, "N": N, "not_run_available_bytes": avail}
                continue
        results[N, m] = measure_cpu_point(m, N, B, H, d, threads)
    threads_used = next((r["threads"] for r in results.values() if "threads" in r), torch.get_num_threads())

    rows = []
    for N in ns:
        math = results[N, "math_jvp"]
        for m in CPU_METHODS:
            r = {k: v for k, v in results[N, m].items() if k != "threads"}
            if m != "math_jvp" and "time_s" in math and "time_s" in r:
                r["math_over_alloc"] = math["alloc_bytes"] / max(r["alloc_bytes"], 1)
                r["math_over_rss"] = math["peak_bytes"] / max(r["peak_bytes"], 1)
            rows.append(r)
    return rows, threads_used


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
    """(seconds, peak extra bytes), or (None, None) when out of memory."""
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
        return None, None
    return t, peak


def run_gpu(ns, dims=(64, 128), dtypes=("bfloat16", "float16"), tokens=16384, heads=16) -> list[dict]:
    """One record per (dtype, d, N): B, the seconds of the fused pass, of torch.func.jvp(attention), of SDPA's flash
    forward and of MATH + torch.func.jvp, and the fused and MATH peaks in bytes; None where it ran out of memory (or,
    for MATH, would)."""
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

        fused_s, fused_peak = _cuda_measure(fused)
        e2e_s, _ = _cuda_measure(e2e)
        flash_s, _ = _cuda_measure(flash)
        free, _ = torch.cuda.mem_get_info()
        est = 8 * B * H * N * N * (2 if dt != torch.float32 else 4) + 4 * B * H * N * N * 4
        math_s, math_peak = (None, None) if est > 0.9 * free else _cuda_measure(math_jvp)
        rows.append({"dtype": dt_name, "d": d, "N": N, "B": B, "fused_s": fused_s, "fused_peak_bytes": fused_peak,
                     "e2e_s": e2e_s, "flash_s": flash_s, "math_s": math_s, "math_peak_bytes": math_peak})
        del q, k, v, qd, kd, vd
        torch.cuda.empty_cache()
    return rows


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
#: steps a GPU point's times are the mean of
SCD_CUDA_REPS = 3


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


def _cuda_scd_point(attention, image_tokens, text_tokens, double, single, reps=SCD_CUDA_REPS) -> dict | None:
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


def run_transformer(device, tokens, attentions, double, single, threads=None, timeout=1800) -> tuple[list[dict], int]:
    """(rows, torch threads used): one record per (tokens, attention) -- image_tokens, text_tokens, attention and
    the point's tangent_peak, peak_bytes (bytes), tangent_s, time_s and loss, or oom."""
    from tqdm import tqdm

    rows = []
    threads_used = torch.get_num_threads()
    for (n_img, n_txt), attention in tqdm([(n, a) for n in tokens for a in attentions], desc="sCD step",
                                          unit="pt"):
        if device == "cpu":
            spec = {"kind": "transformer", "attention": attention, "image_tokens": n_img, "text_tokens": n_txt,
                    "double": double, "single": single, "threads": threads}
            r = _run_point(spec, timeout)
        else:
            r = _cuda_scd_point(attention, n_img, n_txt, double, single)
        row = {"image_tokens": n_img, "text_tokens": n_txt, "attention": attention}
        if r is None:
            row["oom"] = True
        else:
            threads_used = r.pop("threads", threads_used)
            row.update(r)
        rows.append(row)
    return rows, threads_used


def _flux_params(double: int, single: int) -> int:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        net = FluxTransformer2DModel(num_layers=double, num_single_layers=single, **FLUX_WIDTHS)
    return sum(p.numel() for p in net.parameters())


# ------------------------------------------------------------------------------------------------
# The markdown, rendered from the JSON alone
# ------------------------------------------------------------------------------------------------
def _table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _head(d: dict, title: str, config: str) -> list[str]:
    v = d["versions"]
    return [f"# {title}", "", f"- command: `{d['command']}`", f"- device: {d['device_name']}",
            f"- versions: torch {v['torch']}, triton {v['triton']}, python {v['python']}", f"- date: {d['date']}",
            f"- config: {config}"]


def _render_attention_cpu(d: dict) -> str:
    B, H = d["B"], d["H"]
    k = d["math_nn_matrices"]
    rows = []
    for r in d["rows"]:
        nn = B * H * r["N"] * r["N"] * 4  # one fp32 N x N score matrix
        cells = [str(r["N"]), CPU_METHODS[r["method"]], _fmt_bytes(nn)]
        if "time_s" in r:
            cells += [f"{r['time_s']:.2f}", _fmt_bytes(r["alloc_bytes"]), _fmt_bytes(r["peak_bytes"]),
                      *(f"{r[key]:.1f}x" if key in r else "" for key in ("math_over_alloc", "math_over_rss"))]
        elif "not_run_available_bytes" in r:
            cells += ["-", f"not run: needs ~{_fmt_bytes(k * nn)} ({k} x {_fmt_bytes(nn)}), "
                           f"{_fmt_bytes(r['not_run_available_bytes'])} available", "-", "", ""]
        else:
            cells += ["-", "OOM (killed)", "-", "", ""]
        rows.append(cells)
    header = ["N", "attention", "one N x N fp32 (B H N^2 4 bytes)", "time (s)", "peak allocated", "peak RSS",
              "MATH / this, allocated", "MATH / this, RSS"]
    note = ("One fresh subprocess per row. Time: one call, after a tiny warm-up. Peak allocated: the most bytes "
            "torch's CPU allocator held above its level before a second call (profiler memory events; torch has "
            "no CPU allocator statistics) -- the attention's own tensors, O and O' included. Peak RSS: the "
            "process high-water RSS (VmHWM, reset before the call) minus the RSS before the timed call -- adds "
            "what glibc keeps and what BLAS allocates outside torch. Kernel = the blockwise PyTorch backend "
            "(the CPU path; Triton runs on CPU only under TRITON_INTERPRET=1): torch.func.jvp(attention) runs "
            "its forward, then the jvp rule's fused forward+JVP pass; fused_forward_jvp runs that pass alone. "
            f"MATH runs only where {k} fp32 N x N matrices (its measured peak) fit in the "
            f"available RAM minus {_fmt_bytes(d['math_ram_margin_bytes'])}.")
    load = d["load_average"]
    lines = [*_head(d, "Forward + JVP attention on CPU: blockwise kernel vs MATH + torch.func.jvp",
                    f"B={B}, H={H}, d={d['d']}, fp32, torch threads={d['threads']}"),
             f"- {note}", f"- load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f} on {d['cores']} cores",
             *([f"- {d['note']}"] if d["note"] else []), "", _table(header, rows), ""]
    target = d["target"]
    at = {r["method"]: r for r in d["rows"] if r["N"] == target["N"]}
    got = {m: at[m]["math_over_alloc"] for m in ("blockwise_jvp", "blockwise_fused")
           if "math_over_alloc" in at.get(m, {})}
    if len(got) == 2:
        met = min(got.values()) >= target["ratio"]
        lines += [f"**target: MATH / kernel peak allocated >= {target['ratio']}x at N = {target['N']}: "
                  f"{got['blockwise_jvp']:.0f}x through torch.func.jvp(attention), {got['blockwise_fused']:.0f}x "
                  f"fused -- {'met' if met else 'MISSED'}**", ""]
    return "\n".join(lines)


def _render_attention_gpu(d: dict) -> str:
    H = d["H"]

    def tflops(r, factor, key):  # factor B H N^2 d FLOPs over the measured seconds
        return "OOM" if r[key] is None else f"{factor * r['B'] * H * r['N'] ** 2 * r['d'] / r[key] / 1e12:.1f}"

    def ms(t):
        return "OOM" if t is None else f"{t * 1e3:.2f}"

    def mem(b):
        return "OOM" if b is None else _fmt_bytes(b)

    rows = [[r["dtype"], str(r["d"]), str(r["N"]), str(r["B"]), tflops(r, 12, "fused_s"), ms(r["fused_s"]),
             mem(r["fused_peak_bytes"]), ms(r["e2e_s"]), tflops(r, 4, "flash_s"), ms(r["flash_s"]),
             tflops(r, 12, "math_s"), ms(r["math_s"]), mem(r["math_peak_bytes"])] for r in d["rows"]]
    header = ["dtype", "d", "N", "B", "fused fwd+JVP TFLOP/s", "fused ms", "fused peak",
              "func.jvp(attention) ms", "SDPA flash fwd TFLOP/s", "flash ms",
              "MATH+jvp TFLOP/s (12BHN²d)", "MATH+jvp ms", "MATH+jvp peak"]
    note = ("TFLOP/s: fused fwd+JVP and MATH+jvp counted as 12 B H N^2 d, SDPA forward as "
            "4 B H N^2 d. Peak = torch.cuda.max_memory_allocated above the inputs.")
    return "\n".join([*_head(d, "Forward + JVP attention on GPU: Triton kernel vs SDPA flash forward and MATH + jvp",
                             f"H={H}, B = max(1, {d['tokens']} // N)"),
                      f"- {note}", *([f"- {d['note']}"] if d["note"] else []), "", _table(header, rows), ""])


def _render_transformer(d: dict) -> str:
    cpu = d["device"] == "cpu"
    rows = []
    for r in d["rows"]:
        cells = ["OOM"] * 5 if r.get("oom") else [
            _fmt_bytes(r["tangent_peak"]), _fmt_bytes(r["peak_bytes"]), f"{r['tangent_s']:.1f}", f"{r['time_s']:.1f}",
            f"{r['loss']:.6g}"]
        rows.append([f"{r['image_tokens']} + {r['text_tokens']}", r["attention"], *cells])
    header = ["image + text tokens", "generator.attention", "peak tangent (teacher + JVP)", "peak step",
              "time tangent (s)", "time step (s)", "loss"]
    w = d["widths"]
    config = (f"FluxTransformer2DModel, {d['double']} double-stream + {d['single']} single-stream blocks (FLUX.1: "
              f"19 + 38) at FLUX.1's widths ({w['num_attention_heads']} heads x {w['attention_head_dim']}, T5 "
              f"{w['joint_attention_dim']}, pooled {w['pooled_projection_dim']}, RoPE axes "
              f"{'/'.join(map(str, w['axes_dims_rope']))}), random weights, {d['params'] / 1e6:.0f}M parameters; "
              "batch 1, fp32" + (f", torch threads={d['threads']}" if cpu else ""))
    peak = (f"process high-water RSS (VmHWM) minus RSS before the step, one fresh subprocess per point (after a "
            f"{d['warmup_tokens'][0]} + {d['warmup_tokens'][1]} token warm-up of the teacher call and the tangent)"
            if cpu else "torch.cuda.max_memory_allocated above the weights and inputs (after a full-size warm-up "
                        f"step); times are means of {d['reps']} steps")
    return "\n".join([
        *_head(d, "One sCD training step of a Flux-shaped block stack: generator.attention "
               + " vs ".join(d["attentions"]), config),
        "- step: the teacher's velocity (no grad; the student's own weights) and the sCM tangent (`scm_tangent`: "
        "`torch.func.jvp` of the TrigFlow velocity, no grad) -- the 'tangent' columns, measured up to there -- then "
        "the student's velocity with grad and the backward of ||(v - v-) / sigma_d - g||^2 (sCM eq. (9) without the "
        "adaptive weight) into every parameter; no optimizer update. The same seed gives the same loss under every "
        "attention.",
        f"- peak: {peak}. 'peak step' includes the parameter gradients (4 bytes x parameters) under every "
        "attention; 'peak tangent' is reached before any gradient exists.",
        "", _table(header, rows), "",
    ])


def render(d: dict) -> str:
    """The markdown of one JSON this tool wrote (an attention table on CPU or GPU, or a transformer step)."""
    if d["kind"] == "transformer":
        return _render_transformer(d)
    return _render_attention_cpu(d) if d["device"] == "cpu" else _render_attention_gpu(d)


def rendered(folder: Path) -> dict[str, str]:
    """The markdown this tool writes, rendered from the jvp_*.json in ``folder`` alone."""
    return {f.with_suffix(".md").name: render(json.loads(f.read_text(encoding="utf-8")))
            for f in sorted(Path(folder).glob("jvp_*.json"))}


def _write(out_dir: str, stem: str, data: dict) -> None:
    """results/<stem>.json, then the markdown rendered from it alone; refreshes its blocks when out_dir is results/."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    text = rendered(folder)[f"{stem}.md"]
    (folder / f"{stem}.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"written to {folder / stem}.json and .md")
    if folder.resolve() == RESULTS.resolve():
        sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
        from readme_block import update_readme

        update_readme(f"results/{stem}.md")


# ------------------------------------------------------------------------------------------------
def _versions() -> dict:
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "n/a"
    return {"torch": torch.__version__, "triton": tv, "python": platform.python_version()}


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


def transformer_report(args, device: str, run: dict) -> None:
    spec = args.tokens or ("1024+128" if device == "cpu" else "4096+512")
    tokens = [tuple(int(n) for n in pair.split("+")) for pair in spec.split(",")]
    for n_image, _ in tokens:
        if math.isqrt(n_image) ** 2 != n_image:  # a square latent of (side / 2)^2 packed 2x2 patches
            raise SystemExit(f"--tokens: {n_image} image tokens is not a square; use e.g. "
                             f"{math.isqrt(n_image) ** 2} or {(math.isqrt(n_image) + 1) ** 2}")
    attentions = args.attentions.split(",")
    rows, threads = run_transformer(device, tokens, attentions, args.double, args.single, args.threads)
    data = {"kind": "transformer", **run, "attentions": attentions, "double": args.double, "single": args.single,
            "params": _flux_params(args.double, args.single), "widths": FLUX_WIDTHS,
            **({"threads": threads, "warmup_tokens": WARMUP_TOKENS} if device == "cpu" else {"reps": SCD_CUDA_REPS}),
            "rows": rows}
    _write(args.out_dir, f"jvp_transformer_{_device_name(device)[1]}", data)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["render"]:  # rewrite the markdown from its data, running nothing
        for name, text in rendered(RESULTS).items():
            (RESULTS / name).write_text(text, encoding="utf-8")
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--ns", default=None, help="comma-separated sequence lengths")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out-dir", default=str(RESULTS))
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
    name, tag = _device_name(device)
    run = {"device": device, "command": " ".join(["python", "tools/bench_kernels.py", *argv]), "device_name": name,
           "versions": _versions(), "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}
    load = os.getloadavg()[0]
    if args.transformer:
        return transformer_report(args, device, run)
    if device == "cpu":
        ns = [int(x) for x in (args.ns or ",".join(map(str, CPU_NS))).split(",")]
        B, H, d = 1, 8, 64
        rows, threads = run_cpu(ns, B, H, d, threads=args.threads)
        data = {"kind": "attention", **run, "B": B, "H": H, "d": d, "threads": threads,
                "math_nn_matrices": MATH_NN_MATRICES, "math_ram_margin_bytes": MATH_RAM_MARGIN,
                "load_average": [load, os.getloadavg()[0]], "cores": os.cpu_count(), "note": args.note,
                "target": {"ratio": TARGET_RATIO, "N": TARGET_N}, "rows": rows}
    else:
        ns = [int(x) for x in (args.ns or "1024,2048,4096,8192,16384,32768,65536").split(",")]
        tokens, heads = 16384, 16
        data = {"kind": "attention", **run, "H": heads, "tokens": tokens, "note": args.note,
                "rows": run_gpu(ns, tokens=tokens, heads=heads)}
    _write(args.out_dir, f"jvp_attention_{tag}", data)


if __name__ == "__main__":
    main()
