"""The framework's own overhead: steps/s of `onestep train` against a bare loop doing the same math.

    OMP_NUM_THREADS=2 python tools/bench_trainer.py [cases=gmm_dmd2,digits_dmd2,digits_scd] [repeats=2]
    python tools/bench_trainer.py render     # rewrite results/trainer_overhead.md from its JSON, running nothing

For each case the same process builds the experiment twice: once through ``onestep.train.trainer.train`` (accelerate,
the NaN guard, data-parallel batches, phase clock, logging every trainer.log_every, checkpoints at the experiment's
cadence, the tracker off) and once as a bare loop written here from the same pieces (experiment.build, Networks,
the objective's losses, AdamW, clip_grad_norm_, the EMA/target update) with nothing else. Both exclude their first
step (allocation, warm-up). The order alternates over ``repeats`` and the best rate of each is kept, so a busy
moment on a shared machine does not land on one side only. The trainer's own per-phase breakdown (time/<phase>_ms
in stats.jsonl, last log interval) is printed next to it. Writes results/trainer_overhead.json and the markdown
rendered from it, results/trainer_overhead.md, and refreshes its README block.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from hydra import compose, initialize_config_module  # noqa: E402

import onestep.config  # noqa: E402,F401
import onestep.objectives  # noqa: E402,F401
from onestep import experiment  # noqa: E402
from onestep.denoisers.base import guided  # noqa: E402
from onestep.experiment import shape_student  # noqa: E402
from onestep.generator import Student  # noqa: E402
from onestep.networks import Networks  # noqa: E402
from onestep.objectives import make_objective  # noqa: E402
from onestep.train.trainer import train  # noqa: E402

#: case -> (overrides, steps timed): short runs of the shipped experiments, evaluation cut to a minimum
CASES = {
    "gmm_dmd2": (["experiment=gmm_dmd2"], 200),
    "digits_dmd2": (["experiment=digits_dmd2"], 40),
    "digits_scd": (["experiment=digits_scd"], 40),
}
QUIET = ["trainer.progress=false", "trainer.log_with=none", "eval.num_samples=64", "eval.teacher_steps=[1]",
         "eval.plot=false"]


def _cfg(overrides):
    with initialize_config_module("onestep.configs", version_base="1.3"):
        return compose("config", overrides=overrides)


def framework(overrides, steps, run_dir: Path) -> tuple[float, dict]:
    """steps/s of train() over steps 2..N (its stats' last it_per_s) and its last phase breakdown."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    for f in ("stats.jsonl", "evals.jsonl", "config.yaml", "metrics.json", "results.md"):
        (run_dir / f).unlink(missing_ok=True)
    train(_cfg(overrides + QUIET + [f"trainer.steps={steps}"]), run_dir)
    last = json.loads((run_dir / "stats.jsonl").read_text().splitlines()[-1])
    return last["it_per_s"], {k: v for k, v in last.items() if k.startswith("time/")}


def compiled(overrides, steps, run_dir: Path) -> tuple[float, float]:
    """train() with trainer.compile=true: steps/s over steps 2..N and the seconds spent outside them (setup, the
    first step with its compilation, the short evaluation) minus the same for the eager run."""
    torch._dynamo.reset()  # every repeat pays its own compilation
    t0 = time.perf_counter()
    rate, _ = framework(overrides + ["trainer.compile=true"], steps, run_dir)
    return rate, time.perf_counter() - t0 - (steps - 1) / rate


def bare(overrides, steps, run_dir: Path, device: str = "cpu") -> float:
    """steps/s of a hand-written loop with the same nets, batch, objective, TTUR and EMA (steps 2..N) on ``device``
    (tools/gpu_check.py runs it on CUDA)."""
    cfg = _cfg(overrides + QUIET + [f"trainer.steps={steps}"])
    tc, gc = cfg.trainer, cfg.generator
    torch.manual_seed(cfg.seed)
    setup = experiment.build(cfg, run_dir, progress=False)  # (the teacher net / caches the framework run wrote)
    student = Student.from_config(setup.teacher.schedule, gc)
    objective = make_objective(cfg.objective, student.train_sample)
    heads = objective.build_modules(setup)
    objective.set_run(heads, images_per_step=tc.batch_size)
    nets_ = Networks(cfg, setup, critic="critic" in objective.networks, heads=heads, targets=objective.targets(),
                     device=torch.device(device), shape=partial(shape_student, gc, objective=type(objective)))
    nets = nets_.nets(guided(nets_.teacher, cfg.teacher.guidance))
    objective.prepare(nets)

    def adamw(params, oc):
        return torch.optim.AdamW(params, lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay)

    g_params, c_params = nets_.params("generator"), nets_.params("critic")
    opt_g = adamw(g_params, tc.generator_optim)
    opt_c = adamw(c_params, tc.critic_optim) if c_params else None

    def update(loss, params, opt):
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = None
    for step in range(steps):
        if step == 1:
            _sync(device)
            t0 = time.perf_counter()
        torch.manual_seed(step)
        for _ in range(objective.critic_updates):
            update(objective.critic_loss(nets, setup.data.batch(tc.batch_size, device), step)["loss"], c_params, opt_c)
        update(objective.generator_loss(nets, setup.data.batch(tc.batch_size, device), step)["loss"], g_params, opt_g)
        nets_.update_targets()
    _sync(device)
    return (steps - 1) / (time.perf_counter() - t0)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str]) -> None:
    if argv == ["render"]:  # rewrite the markdown from its data, running nothing
        for name, text in rendered(ROOT / "results").items():
            (ROOT / "results" / name).write_text(text, encoding="utf-8")
        return
    opts = dict(a.split("=", 1) for a in argv)
    names = opts.get("cases", ",".join(CASES)).split(",")
    repeats = int(opts.get("repeats", 2))
    root = Path(tempfile.mkdtemp(prefix="bench_trainer_"))
    rows = []
    t_all = time.perf_counter()
    for name in names:
        overrides, steps = CASES[name]
        run = root / name
        if "dmd2" in name:  # DMD's regression pairs built once, read by every run of the case
            overrides = overrides + [f"objective.pairs_file={root / name}_pairs.safetensors"]
        fw, bl, cp, outside, phases = [], [], [], {}, {}
        for r in range(repeats):
            # the compiled side last: after a compilation the process's eager steps ran faster (warm allocator and
            # thread pool), which would favour whichever eager side came next
            order = ("framework", "bare", "compiled") if r % 2 == 0 else ("bare", "framework", "compiled")
            for side in order:
                if side == "framework":
                    t0 = time.perf_counter()
                    rate, phases = framework(overrides, steps, run)
                    outside.setdefault("eager", []).append(time.perf_counter() - t0 - (steps - 1) / rate)
                    fw.append(rate)
                elif side == "compiled":
                    rate, extra = compiled(overrides, steps, run)
                    cp.append(rate)
                    outside.setdefault("compiled", []).append(extra)
                else:
                    if not (run / "config.yaml").exists():  # the bare loop reads the caches the trainer built
                        framework(overrides, 3, run)
                    bl.append(bare(overrides, steps, run))
                rates = {"framework": fw, "bare": bl, "compiled": cp}[side]
                print(f"[{name}] {side}: {rates[-1]:.2f} steps/s", flush=True)
        rows.append({"case": name, "steps": steps, "framework": max(fw), "bare": max(bl), "compiled": max(cp),
                     "compile_s": min(outside["compiled"]) - min(outside["eager"]), "phases": phases})
    shutil.rmtree(root, ignore_errors=True)
    write(rows, time.perf_counter() - t_all, argv)


def write(rows, wall: float, argv) -> None:
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    data = {"command": f"OMP_NUM_THREADS={threads} python tools/bench_trainer.py{' ' + ' '.join(argv) if argv else ''}",
            "wall_s": wall, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "rows": rows}
    (ROOT / "results" / "trainer_overhead.json").write_text(json.dumps(data, indent=1) + "\n")
    text = rendered(ROOT / "results")["trainer_overhead.md"]
    (ROOT / "results" / "trainer_overhead.md").write_text(text)
    print(text)
    from readme_block import update_readme

    update_readme("results/trainer_overhead.md")


def render(d: dict) -> str:
    """results/trainer_overhead.md from its JSON: the command, the rates, their ratios, the trainer's phases."""
    lines = [f"Command: `{d['command']}` ({d['wall_s']:.0f} s wall; {d['machine']}, torch {d['torch']}, CPU).",
             "",
             "Steps/s of `onestep train` vs a bare loop doing the same math in the same process (same nets, batch, "
             "objective, TTUR, EMA; first step excluded on both sides; best of the repeats). Target: framework "
             ">= 0.9x the bare loop. Phases: the trainer's own `time/<phase>_ms` per step over its last log "
             "interval (teacher overlaps critic and generator). `trainer.compile=true`: the same run with its networks "
             "through torch.compile (mode `default` on CPU; sCD's generator stays eager: torch.func.jvp), its steps/s "
             "over the same steps, and the extra seconds outside them (compilation at the first step and at the "
             "evaluation's batch shape).",
             "",
             "| case | steps timed | bare loop (steps/s) | onestep train (steps/s) | ratio | target met | "
             "data | critic | generator | teacher | targets | log | checkpoint (ms/step) | compiled (steps/s) | "
             "compiled / eager | compile time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        p = r["phases"]
        ratio = r["framework"] / r["bare"]
        lines.append(f"| {r['case']} | {r['steps']} | {r['bare']:.2f} | {r['framework']:.2f} | {ratio:.2f} | "
                     f"{'yes' if ratio >= 0.9 else 'no'} | "
                     + " | ".join(f"{p.get(f'time/{k}_ms', 0):.1f}" for k in
                                  ("data", "critic", "generator", "teacher", "targets", "log", "checkpoint"))
                     + f" | {r['compiled']:.2f} | {r['compiled'] / r['framework']:.2f} | {r['compile_s']:.0f} |")
    return "\n".join(lines) + "\n"


def rendered(folder: Path) -> dict[str, str]:
    """The markdown this tool writes, rendered from ``folder``'s trainer_overhead.json alone."""
    return {"trainer_overhead.md": render(json.loads((folder / "trainer_overhead.json").read_text()))}


if __name__ == "__main__":
    main(sys.argv[1:])
