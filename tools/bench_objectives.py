"""Benchmark every objective on the exact Gaussian-mixture tasks, next to the teacher's own sampler, over seeds.

    OMP_NUM_THREADS=1 python tools/bench_objectives.py [tasks=ring8,grid25,classes16] [only=dmd2,sid] \
        [seeds=0,1,2] [jobs=2] [reuse=true] [out=results] [root=runs/bench_objectives] [samples=5000] \
        [hydra.key=value ...]
    python tools/bench_objectives.py render      # rewrite the markdown and the seeds plot from the JSON

Arguments with a dot are Hydra overrides added to every run (e.g. trainer.steps=20 for a smoke run).

For each task (TASKS: a base experiment) it evaluates the teacher (DDIM) at 1/2/4/8/16/32/64 steps, then trains each
BENCH row (task overrides + row overrides) as one Hydra multirun over the seeds,
``onestep train -m experiment=bench_<task> <row overrides> seed=0,1,2 out_root=<root>/<task>/<row>``, into the usual
run folders (``jobs`` multiruns side by side, one thread each). Each seed trains its own DSM student init and its
own 1-/few-step student. From every run folder it reads the final evaluation (metrics.json: sliced-W2, modes covered,
worst per-mode mass error of the EMA generator on the bench's fixed evaluation noise, and the hybrid teacher-first
rows of ``eval.hybrid_teacher_steps``), the training wall time, and the first checkpoint whose sliced-W2 is within
THRESHOLD_X of the teacher's 64-step value; rows report mean +- std over the seeds and whether the task's target
(TARGETS, issue 18) is met. Writes <out>/objectives_gmm.{md,json,png} (one table per task, scatter panels of seed 0),
<out>/objectives_gmm_seeds.png (mean +- std against the targets) and <out>/objectives_gmm_summary.md (the README's
table). Rows not run by this invocation are kept from the previous objectives_gmm.json (``only=<new row>``);
``reuse=true`` reads the rows whose run folders already hold every seed's finished run instead of training them.

To add an objective, add one row to BENCH (e.g. ``"cd": ["objective=cd"]``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from safetensors.torch import load_file

import onestep.config  # noqa: F401
import onestep.objectives  # noqa: F401
from onestep.objectives import objective_class
import onestep.teachers  # noqa: F401
from onestep import checkpoint, experiment
from onestep.denoisers.base import guided
from onestep.denoisers.slim import student_of
from onestep.networks import load_generator
from onestep.schedules import make_schedule
from onestep.eval.evaluators import evaluated
from onestep.eval.report import chunked, eval_inputs
from onestep.generator import Student
from onestep.sampling import sample

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_block import ROOT, update_readme  # noqa: E402

TASKS: dict[str, dict] = {
    "ring8": {"title": "2-D ring, 8 modes", "overrides": ["experiment=bench_ring8"]},
    "grid25": {"title": "2-D grid, 25 modes, unequal weights", "overrides": ["experiment=bench_grid25"]},
    "classes16": {"title": "16-D, 10 classes x 2 components, CFG 2", "overrides": ["experiment=bench_classes16"],
                  "samples": 3000},  # the exact 16-D posterior is costly: fewer evaluation samples
}

#: issue 18's fidelity targets: (metric, at most this many times the teacher's 64-step value, in words); grid25 also
#: needs every mode covered on every seed
TARGETS = {
    "ring8": ("sliced_w2", 2.0, "sliced-W2 <= 2x the teacher's 64-step"),
    "grid25": ("worst_mass_err", 2.0, "25/25 modes on every seed and worst per-mode mass error <= 2x the teacher's "
                                      "64-step"),
    "classes16": ("sliced_w2", 2.0, "sliced-W2 <= 2x the teacher's 64-step"),
}

CD = ["objective=cd", "generator.sigma_init=null", "generator.consistency_boundary=true", "trainer.generator_optim.lr=1e-3"]
SCD = ["objective=scd", "generator.sigma_init=null", "objective.warmup_steps=200", "trainer.generator_optim.lr=1e-3"]
RCM = ["objective=rcm", "generator.sigma_init=null", "objective.warmup_steps=200", "objective.dm_weight=0.1",
       "objective.ttur=2", "trainer.generator_optim.lr=1e-3", "trainer.critic_optim.lr=1e-3"]
DMD2 = ["objective=dmd2", "objective.discriminator=critic", "objective.gan_weight=0.01"]
#: MeanFlow and reflow train on rectified-flow time (their run's own teacher schedule; the evaluation is in data
#: space against the same exact mixture); configs/experiment/gmm_{meanflow,reflow,tbcm}.yaml
MEANFLOW = ["objective=meanflow", "teacher.schedule=rectified_flow", "generator.sigma_init=null", "objective.loss=l2",
            "objective.flow_matching_ratio=0.25", "objective.consistency_ratio=0.75", "trainer.generator_optim.lr=1e-3"]
REFLOW = ["objective=reflow", "teacher.schedule=rectified_flow", "generator.sigma_init=null",
          "objective.reflow_steps=200", "trainer.generator_optim.lr=1e-3"]  # the budget split 200 reflow + rest
#: SlimFlow: reflow's time axis and budget split (200 steps of Annealing Reflow, beta 1 -> 0 over the first 100, then
#: flow-guided distillation) into a student a quarter of the teacher net's width with one of its three blocks
#: (configs/experiment/gmm_slimflow.yaml)
SLIMFLOW = ["objective=slimflow", "teacher.schedule=rectified_flow", "generator.sigma_init=null",
            "generator.arch='hidden=32,depth=1'", "objective.reflow_steps=200", "objective.anneal_steps=100",
            "trainer.generator_optim.lr=1e-3"]
TBCM = ["objective=tbcm", "generator.sigma_init=null", "objective.warmup_steps=200", "trainer.generator_optim.lr=1e-3"]
#: TCM: 200 steps of CD (stage 1, frozen) then 200 of truncated CD at t >= t' (configs/experiment/gmm_tcm.yaml); TSCD:
#: Hyper-SD's 8 -> 4 -> 2 segments for 100 steps each, then plain CD (configs/experiment/gmm_tscd.yaml)
TCM = ["objective=tcm", "objective.stage1_steps=200"] + CD[1:]
TSCD = ["objective=tscd", "objective.stage_steps=[100,100,100]"] + CD[1:]
#: MLCM: TSCD's segments and stages on consecutive states of the teacher's own Heun trajectories from prior noise
#: (configs/experiment/gmm_mlcm.yaml)
MLCM = ["objective=mlcm", "objective.stage_steps=[100,100,100]"] + CD[1:]
#: SCott: CD with the teacher's SDE over 3 sub-steps at noise strength eta = 0.3 (the paper's eta = 1 leaves a 1-step
#: student at the mixture mean on the ring: configs/experiment/gmm_scott.yaml); BOOT: data-free bootstrapping of the
#: teacher's ODE from the noise end (configs/experiment/gmm_boot.yaml; a 1-step method, no 2-step row)
SCOTT = ["objective=scott", "objective.eta=0.3", "objective.substeps=3"] + CD[1:]
BOOT = ["objective=boot", "generator.sigma_init=null", "objective.delta=0.05", "objective.span=0.25",
        "trainer.generator_optim.lr=1e-3"]
#: the student samples on the teacher rows' own 16-step t-list (EDM's rho = 7 spacing, schedule.default_ts): the
#: generator's default 16-step list is even in t, which on EDM is sigma 80, 75, ..., 5 and a last jump from sigma 5
GUIDANCE_TS = ",".join(f"{t:.6g}" for t in make_schedule("edm").default_ts(16).tolist())
GUIDANCE_DISTILL = ["objective=guidance_distill", "generator.sigma_init=null", "generator.steps=16", "generator.method=ddim",
                    f"generator.ts=[{GUIDANCE_TS}]", "generator.guidance_input=${teacher.guidance}",
                    "eval.student_steps=[16]", "trainer.steps=600",
                    "trainer.generator_optim.lr=1e-3", "trainer.generator_optim.betas=[0.9,0.99]"]
#: LoRA-enhanced guidance distillation (Golnari 2023; configs/experiment/gmm_guidance_distill_lora.yaml): the same
#: 16-step student as a rank-8 LoRA view of the shared base, trained at the one scale w = teacher.guidance
GUIDANCE_DISTILL_LORA = [o for o in GUIDANCE_DISTILL if not o.startswith("generator.guidance_input=")] + [
    "generator.lora.rank=8", "objective.w_min=${teacher.guidance}", "objective.w_max=${teacher.guidance}"]
FLOW_TWO_STEP = ["generator.steps=2", "generator.ts=[0.9999,0.5]", "eval.student_steps=[2]"]
#: few-step consistency students sample from sigma_max = 80 (EDM): 2 steps at sigma 80 -> 0.8, 4 steps on Karras'
#: rho = 7 spacing from 80 to 0.5. The few-step DMD2 students start where the 1-step rows do (sigma_init = 1: from
#: sigma_max, 400-500 steps of backward simulation left them at 5-8 of 8 ring modes) on the evenly spaced t-list
#: below it (1, 0.5 / 1, 0.75, 0.5, 0.25), trained for their step count (backward simulation), and also report
#: hybrid sampling with the teacher taking the first step (Gandikota & Bau 2025)
TWO_STEP = ["generator.steps=2", "generator.ts=[80.0,0.8]", "eval.student_steps=[2]"]
FOUR_STEP = ["generator.steps=4", "generator.ts=[80.0,21.4,4.2,0.5]", "eval.student_steps=[4]"]
HYBRID = ["eval.hybrid_teacher_steps=[1]"]
#: TDM: one fake-score update per generator update, the official demo's (onestep/objectives/tdm.py)
TDM = ["objective=tdm", "objective.ttur=1"]
#: flow map distillation without data: rectified-flow time (the paper's frame) like MeanFlow, the one-step map from the
#: prior; a 1-step method (the map is trained from t_max only), no 2-step row (configs/experiment/gmm_flow_map.yaml)
FLOW_MAP = ["objective=flow_map", "teacher.schedule=rectified_flow", "generator.sigma_init=null",
            "trainer.generator_optim.lr=1e-3", "trainer.critic_optim.lr=1e-3"]
FEW_STEP_TASKS = ("ring8", "grid25")  # the few-step and consistency rows (classes16: 1-step objectives only)

#: objective rows: name -> overrides added to each task's bench_<task>.yaml (unset keys: the objective's defaults)
BENCH: dict[str, list[str]] = {
    "dmd": ["objective=dmd", "objective.regression_weight=0.25"],
    "dmd2": DMD2,
    "vsd": ["objective=vsd"],
    "sid": ["objective=sid"],
    "sida": ["objective=sida"],
    "sim": ["objective=sim"],
    "fdistill": ["objective=fdistill"],
    "adversarial": ["objective=adversarial"],
    "dmd2_2step": DMD2 + ["generator.steps=2", "eval.student_steps=[2]"] + HYBRID,
    "dmd2_4step": DMD2 + ["generator.steps=4", "eval.student_steps=[4]"] + HYBRID,
    # consistency family (configs/experiment/gmm_{cd,scd,rcm}.yaml): sampling starts at sigma_max as consistency
    # models are trained to (no sigma_init)
    "cd": CD,
    "cd_2step": CD + TWO_STEP,
    "cd_4step": CD + FOUR_STEP,
    "scd": SCD,
    "scd_2step": SCD + TWO_STEP,
    "rcm": RCM,
    "rcm_2step": RCM + TWO_STEP,
    "meanflow": MEANFLOW,
    "meanflow_2step": MEANFLOW + FLOW_TWO_STEP,
    "reflow": REFLOW,
    "reflow_2step": REFLOW + FLOW_TWO_STEP,
    "tbcm": TBCM,
    "tbcm_2step": TBCM + TWO_STEP,
    "tcm": TCM,
    "tcm_2step": TCM + TWO_STEP,
    "tscd": TSCD,
    "tscd_2step": TSCD + TWO_STEP,
    "scott": SCOTT,
    "scott_2step": SCOTT + TWO_STEP,
    "boot": BOOT,
    # issue 22 (classes16): SNOOPI's PG-SB (the real score's CFG scale w ~ U[1.5, 2.5] per sample, around the
    # teacher's 2; configs of tests/test_snoopi.py), MSD's 4 routed students (configs/experiment/gmm_msd.yaml) and
    # guidance distillation (configs/experiment/gmm_guidance_distill.yaml: a w-conditioned 16-step DDIM student, one
    # pass per step where the guided teacher takes two; trained 600 steps)
    "vsd_pgsb": ["objective=vsd", "objective.guidance_range=[1.5,2.5]"],
    "sid_pgsb": ["objective=sid", "objective.guidance_range=[1.5,2.5]"],
    "dmd2_pgsb": DMD2 + ["objective.guidance_range=[1.5,2.5]"],
    "msd": ["objective=msd", "generator.students=4", "generator.partition=contiguous", "objective.ttur=5"],
    "guidance_distill_16step": GUIDANCE_DISTILL,
    "guidance_distill_lora_16step": GUIDANCE_DISTILL_LORA,
    # Phased DMD: 2 experts, one per step, phase 0 trained alone for 150 steps (configs/experiment/gmm_phased_dmd.yaml);
    # DisBack: 40 steps of recording the degradation path (4 points), then 30 steps per point backwards
    # (configs/experiment/gmm_disback.yaml)
    "phased_dmd_2step": ["objective=phased_dmd", "generator.steps=2", "generator.experts=2", "generator.method=ddim",
                         "objective.phase_length=150", "eval.student_steps=[2]"],
    "disback": ["objective=disback", "objective.degrade_steps=40", "objective.path_points=4",
                "objective.backtrack_steps=30"],
    # issue 37: TDM (configs/experiment/gmm_tdm.yaml): distribution matching at the student's own trajectory points,
    # t within each step's segment; the 1-step row is DMD's direction with TDM's fake score (importance weight 1 there),
    # the 2-step row a DDIM student from sigma_init 1 (as the few-step DMD2 rows)
    "tdm": TDM,
    "tdm_2step": TDM + ["generator.steps=2", "generator.method=ddim", "eval.student_steps=[2]"],
    # flow map distillation without data (onestep/objectives/flow_map.py): prediction from prior samples + correction
    "flow_map": FLOW_MAP,
    # MLCM (onestep/objectives/mlcm.py): one model for 1 and 2 steps, as tscd's rows
    "mlcm": MLCM,
    "mlcm_2step": MLCM + TWO_STEP,
    # APEX (configs/experiment/gmm_apex.yaml): one network, its shifted-condition branch the fake flow, the teacher's
    # the real one; no critic update
    "apex": ["objective=apex"],
    # SlimFlow (onestep/objectives/slimflow.py): a smaller student (generator.arch), 1-step
    "slimflow": SLIMFLOW,
}
#: the tasks a row runs on (rows not named here: every task). Few-step and consistency rows: ring8 and grid25; issue
#: 21's methods' 1-step rows every task; guidance and multi-student rows need classes: classes16
FEW_STEP_ROWS = {"dmd2_2step", "dmd2_4step", "cd", "cd_2step", "cd_4step", "scd", "scd_2step", "rcm", "rcm_2step"}
CLASS_ROWS = {"guidance_distill_16step", "guidance_distill_lora_16step", "vsd_pgsb", "sid_pgsb", "dmd2_pgsb", "msd", "phased_dmd_2step"}
#: the 2-step rows of issue 21's methods: on the ring only (their 1-step rows run on every task)
RING_ROWS = {"meanflow_2step", "reflow_2step", "tbcm_2step", "tcm_2step", "tscd_2step", "scott_2step", "mlcm_2step"}
ROW_TASKS = {**{b: FEW_STEP_TASKS for b in FEW_STEP_ROWS | {"tdm_2step"}}, **{b: ("classes16",) for b in CLASS_ROWS},
             **{b: ("ring8",) for b in RING_ROWS}}

TEACHER_STEPS = (1, 2, 4, 8, 16, 32, 64)
THRESHOLD_X = 3.0  # "converged": sliced-W2 within 3x of the teacher's 64-step sampler
EVAL_SEED = 12345  # the trainer's evaluation seed (onestep.eval.report.compare)
CHECKPOINTS = 8  # checkpoints per run, evaluated for steps-to-threshold
#: the summary's rows (the consistency family's 1-/2-step rows: results/objectives_gmm.md)
SUMMARY_ROWS = ("dmd", "dmd2", "vsd", "sid", "sida", "sim", "fdistill", "adversarial", "dmd2_2step",
                "dmd2_2step_hybrid1", "dmd2_4step", "dmd2_4step_hybrid1", "cd_4step",
                # issue 21 (trajectory / consistency) and issue 22 (distribution matching, guidance)
                "meanflow", "meanflow_2step", "reflow", "reflow_2step", "tbcm", "tbcm_2step", "tcm", "tcm_2step", "tscd",
                "tscd_2step", "scott", "scott_2step", "boot", "disback", "phased_dmd_2step", "vsd_pgsb", "sid_pgsb",
                "dmd2_pgsb", "msd", "guidance_distill_16step",
                # issue 37
                "tdm", "tdm_2step", "flow_map", "mlcm", "mlcm_2step", "apex", "guidance_distill_lora_16step",
                "slimflow")
SUMMARY_TEACHER_STEPS = (1, 4, 16, 64)
SUMMARY_LABELS = {"fdistill": "`fdistill` (js)"}
SUMMARY_COLUMNS = {"ring8": "ring8 (8 modes)", "grid25": "grid25 (25 modes, weights up to 4x apart)",
                   "classes16": "classes16 (16-D, 10 classes, CFG 2)"}
METRICS = ("sliced_w2", "worst_mass_err", "modes_covered", "wall_s")


def compose_cfg(overrides: list[str]):
    with initialize_config_module("onestep.configs", version_base="1.3"):
        return compose("config", overrides=overrides)


def task_cfg(task: str):
    return compose_cfg(TASKS[task]["overrides"] + ["objective=dmd2"])


def rows_of(task: str, names: list[str]) -> list[str]:
    return [b for b in names if task in ROW_TASKS.get(b, TASKS)]


def teacher_rows(task: str, root: Path, n: int, extra: list[str]):
    """Teacher DDIM at TEACHER_STEPS on the evaluation noise (the exact mixture: the same for every seed)."""
    cfg = compose_cfg(TASKS[task]["overrides"] + ["objective=dmd2", f"eval.num_samples={n}"] + extra)
    cache = root / task / "_teacher"
    cache.mkdir(parents=True, exist_ok=True)
    setup = evaluated(cfg, experiment.build(cfg, cache, progress=False))
    teacher = guided(setup.teacher, cfg.teacher.guidance)
    noise, cond = eval_inputs(setup, n, EVAL_SEED)
    rows, samples = [], {}
    for k in TEACHER_STEPS:
        rng = torch.Generator().manual_seed(EVAL_SEED)
        ts = teacher.schedule.default_ts(k)
        t0 = time.perf_counter()
        x = chunked(lambda z, c: sample(teacher, z, ts, c, method="ddim", generator=rng), noise, cond)  # noqa: B023
        m = setup.evaluator.metrics(x, cond)
        rows.append({"name": f"teacher {k} step{'s' if k > 1 else ''}", "nfe": k,
                     **_metrics(m, time.perf_counter() - t0)})
        samples[rows[-1]["name"]] = (x, cond)
    return setup, rows, samples


def _metrics(m: dict, wall: float) -> dict:
    return {"sliced_w2": m["sliced_w2"], "worst_mass_err": m["worst_mode_mass_err"],
            "modes_covered": m["modes_covered"], "num_modes": m["num_modes"], "wall_s": wall}


def train_command(task: str, name: str, root: Path, seeds: list[int], n: int, extra: list[str], steps: int):
    every = max(1, steps // CHECKPOINTS)
    return [str(Path(sys.executable).with_name("onestep")), "train", "-m", *TASKS[task]["overrides"], *BENCH[name],
            *extra, "trainer.progress=false", "trainer.log_with=none", "eval.teacher_steps=[1]",
            f"eval.num_samples={n}", "eval.plot=false",
            f"trainer.checkpoint_every={every}", f"trainer.keep_checkpoints={CHECKPOINTS + 1}",
            f"seed={','.join(map(str, seeds))}", f"out_root={root / task / name}"]


def train_seeds(cmd: list[str], folder: Path) -> None:
    """One Hydra multirun (all seeds of one row), one thread, its output in <folder>/train.log."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with open(folder / "train.log", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            cwd=ROOT).returncode
    if rc != 0:
        tail = (folder / "train.log").read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}:\n{tail}")


def run_folders(folder: Path) -> list[Path]:
    """The run folders of one row's multirun, by seed."""
    runs = [p.parent for p in folder.rglob("metrics.json") if ".hydra" not in p.parts]
    return sorted(runs, key=lambda r: OmegaConf.load(r / "config.yaml").seed)


@functools.cache
def _row_cfg(task: str, name: str):
    return compose_cfg(TASKS[task]["overrides"] + BENCH[name])


def run_cfg(task: str, name: str, run: Path):
    """A run folder's saved config on today's schema (keys added since the run keep their defaults)."""
    return OmegaConf.merge(_row_cfg(task, name), OmegaConf.load(run / "config.yaml"))


def collect(task: str, name: str, folder: Path, setup, threshold: float, n: int):
    """Per-seed records of a row (and of its hybrid rows) from its run folders; seed 0's final samples."""
    per: dict[str, list[dict]] = {}
    nfe: dict[str, int] = {}
    first = None
    for run in run_folders(folder):
        cfg = run_cfg(task, name, run)
        setup = _setup_for(task, cfg, run, setup)
        metrics = json.loads((run / "metrics.json").read_text())
        wall = metrics["seconds"]["setup"] + metrics["seconds"]["distill"]
        for r in metrics["rows"]:
            if r["model"] == "student":
                row, reached = name, steps_to_threshold(cfg, run, setup, threshold, min(n, 2000))
            elif r["model"].endswith("+ student"):
                row, reached = f"{name}_hybrid{r['model'].split()[1]}", None
            else:
                continue
            nfe[row] = r["nfe"]
            per.setdefault(row, []).append({"seed": int(cfg.seed), "steps_to_threshold": reached,
                                            **_metrics(r, wall)})
        if first is None:
            first = _student_samples(cfg, setup, checkpoint.list_checkpoints(run)[-1], n)
    if not per:
        raise RuntimeError(f"{folder}: no finished run folders (metrics.json); see {folder / 'train.log'}")
    return [aggregate(row, nfe[row], recs) for row, recs in per.items()], first


def _setup_for(task: str, cfg, run: Path, setup):
    """The task's setup, or the run's own for a row on another time axis (MeanFlow, reflow; reads its cached
    teacher net)."""
    if cfg.teacher.schedule != task_cfg(task).teacher.schedule:
        return evaluated(cfg, experiment.build(cfg, run, progress=False))
    return setup


def saved_panels(task: str, rows: list[dict], root: Path, setup, n: int) -> list:
    """Scatter panels of a task this invocation did not run: seed 0's final samples from each row's run folder."""
    out = []
    for r in rows:
        runs = [] if r["name"].startswith("teacher") or "_hybrid" in r["name"] else run_folders(root / task / r["name"])
        if runs:
            cfg = run_cfg(task, r["name"], runs[0])
            x = _student_samples(cfg, _setup_for(task, cfg, runs[0], setup), checkpoint.list_checkpoints(runs[0])[-1], n)
            out.append((r["name"], x, r["seeds"][0]["sliced_w2"]))
    return out


def aggregate(name: str, nfe: int, seeds: list[dict]) -> dict:
    out = {"name": name, "nfe": nfe, "seeds": seeds, "num_modes": seeds[0]["num_modes"],
           "steps_to_threshold": [s["steps_to_threshold"] for s in seeds]}
    for k in METRICS:
        vals = [float(s[k]) for s in seeds]
        out[k] = statistics.fmean(vals)
        out[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out[f"{k}_min"] = min(vals)
    return out


def target(task: str, row: dict, t64: dict) -> tuple[bool, str]:
    """(met, cell text) of the task's target for a row of means."""
    key, factor, _ = TARGETS[task]
    x = row[key] / max(t64[key], 1e-12)
    met = x <= factor
    if task == "grid25" and row.get("modes_covered_min", row["modes_covered"]) < row["num_modes"]:
        met = False
        return met, f"missed: {row['modes_covered_min']:.0f}/{row['num_modes']} modes on a seed"
    what = "sliced-W2" if key == "sliced_w2" else "mass err"
    return met, f"{'met' if met else 'missed'}: {what} {x:.1f}x"


def _generator(setup, ckpt: Path, cfg):
    """The EMA generator of checkpoint ``ckpt`` built as the run builds it (networks.load_generator): the run's shape
    (consistency_boundary, routed students, experts), a LoRA view of the shared base, a generator.arch network."""
    objective = objective_class(cfg.objective.name)
    # (a LoRA generator's adapters go into the network it is built from: build each checkpoint's from a copy)
    setup = dataclasses.replace(setup, student_init=copy.deepcopy(setup.student_init))
    if cfg.generator.arch:  # (the task's setup is the teacher-shaped one; the checkpoint's weights replace the init's)
        setup = dataclasses.replace(setup, generator_init=student_of(setup.student_init, cfg.generator.arch)[0])
    net, _ = load_generator(cfg, setup, ckpt.parent.parent, shape=functools.partial(experiment.shape_student, cfg.generator,
                                                                           objective=objective),
                            upto=checkpoint.step_of(ckpt))
    return net


def _student_samples(cfg, setup, ckpt: Path, n: int):
    gc = cfg.generator
    student = Student.from_config(setup.teacher.schedule, gc)
    net = _generator(setup, ckpt, cfg)
    noise, cond = eval_inputs(setup, n, EVAL_SEED)
    rng = torch.Generator().manual_seed(EVAL_SEED)
    with torch.no_grad():
        return chunked(lambda z, c: student.sample(net, z, c, None, rng), noise, cond), cond


def steps_to_threshold(cfg, run: Path, setup, threshold: float, n: int):
    for ckpt in checkpoint.list_checkpoints(run):
        x, cond = _student_samples(cfg, setup, ckpt, n)
        if setup.evaluator.metrics(x, cond)["sliced_w2"] <= threshold:
            return int(ckpt.name.split("_")[1])
    return None


def _pm(row: dict, key: str, fmt: str) -> str:
    std = row.get(f"{key}_std")
    return fmt.format(row[key]) + ("" if not std else " ± " + fmt.format(std))


def _modes(row: dict) -> str:
    lo = row.get("modes_covered_min", row["modes_covered"])
    hi = max((s["modes_covered"] for s in row.get("seeds", [])), default=lo)
    return f"{lo:.0f}/{row['num_modes']}" if lo == hi else f"{lo:.0f}-{hi:.0f}/{row['num_modes']}"


def _reached(row: dict) -> str:
    vals = row.get("steps_to_threshold")
    if vals is None or not isinstance(vals, list):
        return "" if vals is None else str(vals)
    if all(v is None for v in vals):
        return "" if "_hybrid" in row["name"] else "not reached"
    return "/".join("-" if v is None else str(v) for v in vals)


def markdown(task: str, rows: list[dict], threshold: float) -> str:
    t64 = [r for r in rows if r["name"] == "teacher 64 steps"][0]
    lines = [f"### {TASKS[task]['title']} (`{task}`)", "",
             f"Target: {TARGETS[task][2]} ({t64[TARGETS[task][0]]:.4g}). 'Steps to threshold' (per seed): the first "
             f"checkpoint with sliced-W2 <= {threshold:.4f} ({THRESHOLD_X:g}x the teacher's 64-step "
             f"{t64['sliced_w2']:.4f}).", "",
             "| model | NFE | seeds | sliced-W2 | x teacher-64 | modes | worst mode mass err | target | wall (s) | "
             "steps to threshold |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        teacher = r["name"].startswith("teacher")
        seeds = "" if teacher else str(len(r.get("seeds", [])) or 1)
        tgt = "" if teacher else target(task, r, t64)[1]
        lines.append(f"| {r['name']} | {r['nfe']} | {seeds} | {_pm(r, 'sliced_w2', '{:.4f}')} | "
                     f"{r['sliced_w2'] / t64['sliced_w2']:.2f} | {_modes(r)} | {_pm(r, 'worst_mass_err', '{:.1%}')} | "
                     f"{tgt} | {r['wall_s']:.1f} | {'' if teacher else _reached(r)} |")
    return "\n".join(lines)


def summary(results: dict) -> str:
    """One row per teacher step count / objective, one column per task: sliced-W2 mean ± std (x the teacher's
    64-step), modes, worst mode mass error mean ± std, target met."""
    tasks = [t for t in TASKS if t in results]
    by_name = {t: {r["name"]: r for r in results[t]} for t in tasks}

    def cell(task: str, name: str) -> str:
        r = by_name[task].get(name)
        if r is None:
            return ""
        base = f"{_pm(r, 'sliced_w2', '{:.3f}')}, {_modes(r)}, {_pm(r, 'worst_mass_err', '{:.0%}')}"
        if name.startswith("teacher"):
            return base
        t64 = by_name[task]["teacher 64 steps"]
        met, _ = target(task, r, t64)
        return (f"**{_pm(r, 'sliced_w2', '{:.3f}')}** ({r['sliced_w2'] / t64['sliced_w2']:.1f}x), {_modes(r)}, "
                f"{_pm(r, 'worst_mass_err', '{:.0%}')}, {'**met**' if met else 'missed'}")

    lines = ["Written by `OMP_NUM_THREADS=1 python tools/bench_objectives.py jobs=2` (from "
             "`results/objectives_gmm.json`). Each cell: sliced-W2 mean ± std over the seeds (x the teacher's 64-step "
             "DDIM), modes covered (range over seeds), worst per-mode relative mass error mean ± std, and whether the "
             "task's target is met — " + "; ".join(f"{t}: {TARGETS[t][2]}" for t in tasks) + ".", "",
             "| | " + " | ".join(SUMMARY_COLUMNS.get(t, t) for t in tasks) + " |", "|---|" + "---|" * len(tasks)]
    for k in SUMMARY_TEACHER_STEPS:
        name = f"teacher {k} step{'s' if k > 1 else ''}"
        lines.append(f"| teacher DDIM {k} NFE | " + " | ".join(cell(t, name) for t in tasks) + " |")
    for name in SUMMARY_ROWS:
        if any(name in by_name[t] for t in tasks):
            nfe = next(by_name[t][name]["nfe"] for t in tasks if name in by_name[t])
            label = SUMMARY_LABELS.get(name, f"`{name}`")
            lines.append(f"| {label} {nfe} NFE | " + " | ".join(cell(t, name) for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def plot_seeds(path: Path, results: dict) -> None:
    """Per task: sliced-W2 and worst mode mass error of every row as a multiple of the teacher's 64-step value, mean
    ± std over seeds, with the 2x target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if t in results]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 0.28 * max(len(results[t]) for t in tasks) * len(tasks) + 1),
                             squeeze=False)
    for i, task in enumerate(tasks):
        rows = [r for r in results[task] if not r["name"].startswith("teacher")]
        t64 = [r for r in results[task] if r["name"] == "teacher 64 steps"][0]
        for j, key in enumerate(("sliced_w2", "worst_mass_err")):
            ax = axes[i][j]
            y = range(len(rows))
            ax.errorbar([r[key] / t64[key] for r in rows], y, xerr=[r.get(f"{key}_std", 0) / t64[key] for r in rows],
                        fmt="o", ms=3, capsize=2)
            ax.axvline(2.0, color="tab:red", lw=1, ls="--")
            ax.axvline(1.0, color="grey", lw=0.8)
            ax.set_yticks(list(y))
            ax.set_yticklabels([r["name"] for r in rows], fontsize=7)
            ax.invert_yaxis()
            ax.set_xscale("log")
            ax.set_title(f"{task}: {'sliced-W2' if key == 'sliced_w2' else 'worst mode mass err'} / teacher-64",
                         fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot(path: Path, panels_by_task: dict[str, tuple]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(p) for _, p in panels_by_task.values())
    fig, axes = plt.subplots(len(panels_by_task), cols, figsize=(2.1 * cols, 2.3 * len(panels_by_task)),
                             squeeze=False)
    for row, (task, (setup, panels)) in enumerate(panels_by_task.items()):
        ev = setup.evaluator
        ref = ev.mixture.sample(20000, generator=torch.Generator().manual_seed(0)) @ ev.view
        lim = float(ref.abs().max()) * 1.2
        for col in range(cols):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(panels):
                ax.axis("off")
                continue
            title, (x, _), sw2 = panels[col]
            ax.hist2d(ref[:, 0].numpy(), ref[:, 1].numpy(), bins=100, range=[[-lim, lim], [-lim, lim]], cmap="Greys",
                      density=True)
            p = (x.double() @ ev.view)[:3000]
            ax.scatter(p[:, 0].numpy(), p[:, 1].numpy(), s=1, alpha=0.5,
                       color="tab:blue" if title.startswith("teacher") else "tab:red")
            ax.set_title(f"{title}\nSW2 {sw2:.3f}", fontsize=7)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
        axes[row][0].set_ylabel(task, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    if argv == ["render"]:
        results = json.loads(Path("results/objectives_gmm.json").read_text())
        _write(Path("results"), results)
        plot_seeds(Path("results/objectives_gmm_seeds.png"), results)
        return 0
    extra = [a for a in argv if "." in a.split("=", 1)[0]]
    args = dict(a.split("=", 1) for a in argv if a not in extra)
    tasks = args.get("tasks", ",".join(TASKS)).split(",")
    names = args.get("only", ",".join(BENCH)).split(",")
    seeds = [int(s) for s in args.get("seeds", "0,1,2").split(",")]
    jobs = int(args.get("jobs", 1))
    reuse = args.get("reuse", "false") == "true"
    out, root = Path(args.get("out", "results")), Path(args.get("root", "runs/bench_objectives")).resolve()
    samples_default = int(args.get("samples", 5000))
    unknown = [t for t in tasks if t not in TASKS] + [b for b in names if b not in BENCH]
    if unknown:
        print(f"bench_objectives: unknown task/objective {unknown}; tasks {list(TASKS)}, objectives {list(BENCH)}",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "objectives_gmm.json"
    results = _current(json.loads(saved.read_text())) if saved.exists() else {}
    setups, panels, fresh = {}, {}, {}
    for task in tasks:
        n = TASKS[task].get("samples", samples_default)
        setup, rows, samples = teacher_rows(task, root, n, extra)
        setups[task] = setup
        panels[task] = [(r["name"].replace(" steps", "").replace(" step", ""), samples[r["name"]], r["sliced_w2"])
                        for r in rows]
        fresh[task] = {r["name"]: r for r in rows}
        print(f"[{task}] teacher rows done", flush=True)
    commands = {(task, name): train_command(task, name, root, seeds, TASKS[task].get("samples", samples_default),
                                            extra, compose_cfg(TASKS[task]["overrides"] + BENCH[name] + extra)
                                            .trainer.steps)
                for task in tasks for name in rows_of(task, names)}
    if reuse:  # rows whose run folders hold every seed's finished run are read, not trained again
        commands = {k: (None if len(run_folders(root / k[0] / k[1])) == len(seeds) else cmd)
                    for k, cmd in commands.items()}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(train_seeds, cmd, root / task / name) if cmd else pool.submit(lambda: None):
                   (task, name) for (task, name), cmd in commands.items()}
        for fut in as_completed(futures):
            task, name = futures[fut]
            fut.result()
            n = TASKS[task].get("samples", samples_default)
            threshold = THRESHOLD_X * fresh[task]["teacher 64 steps"]["sliced_w2"]
            rows, x = collect(task, name, root / task / name, setups[task], threshold, n)
            for r in rows:
                fresh[task][r["name"]] = r
                print(f"[{task}] {r['name']}: sliced-W2 {r['sliced_w2']:.4f} ± {r['sliced_w2_std']:.4f} "
                      f"mass err {r['worst_mass_err']:.1%} ± {r['worst_mass_err_std']:.1%}", flush=True)
            panels[task].append((name, x, rows[0]["seeds"][0]["sliced_w2"]))
            _merge(results, fresh)
            _write(out, results)
    _merge(results, fresh)
    _write(out, results)
    for task in [t for t in TASKS if t in results and t not in tasks]:  # re-plot the tasks kept from before
        n = TASKS[task].get("samples", samples_default)
        setups[task], _, samples = teacher_rows(task, root, n, extra)
        panels[task] = [(name.replace(" steps", "").replace(" step", ""), samples[name],
                         next(r["sliced_w2"] for r in results[task] if r["name"] == name)) for name in samples]
        panels[task] += saved_panels(task, results[task], root, setups[task], n)
    plot(out / "objectives_gmm.png", {t: (setups[t], panels[t]) for t in TASKS if t in panels})
    plot_seeds(out / "objectives_gmm_seeds.png", results)
    return 0


def _current(results: dict) -> dict:
    """The rows of a saved JSON that this protocol wrote (teacher rows with mode counts, student rows with seeds);
    a task left without its teacher's 64-step row is dropped."""
    out = {}
    for task, rows in results.items():
        rows = [r for r in rows if "seeds" in r or (r["name"].startswith("teacher") and "modes_covered" in r)]
        if task in TASKS and any(r["name"] == "teacher 64 steps" for r in rows):
            out[task] = rows
    return out


def _merge(results: dict, fresh: dict) -> None:
    """This invocation's rows replace the same-named rows; the others are kept; rows in TEACHER_STEPS / BENCH order."""
    for task, rows in fresh.items():
        merged = {r["name"]: r for r in results.get(task, [])} | rows
        order = [f"teacher {k} step{'s' if k > 1 else ''}" for k in TEACHER_STEPS]
        for b in BENCH:
            order += [b] + sorted(n for n in merged if n.startswith(b + "_hybrid"))
        results[task] = [merged[n] for n in order if n in merged]


def _write(out: Path, results: dict) -> None:
    (out / "objectives_gmm.json").write_text(json.dumps(results, indent=1))
    for name, text in rendered(out).items():
        (out / name).write_text(text)
    if out.resolve() == ROOT / "results":
        update_readme("results/objectives_gmm_summary.md")


def rendered(folder: Path) -> dict[str, str]:
    """The markdown this tool writes (the tables, the summary), rendered from ``folder``'s objectives_gmm.json alone."""
    results = json.loads((folder / "objectives_gmm.json").read_text())
    head = ("# Objectives on exact Gaussian mixtures\n\nStudents (EMA generator) vs the teacher's DDIM sampler on the "
            "same evaluation noise, mean ± std over seeds; written by `OMP_NUM_THREADS=1 python "
            "tools/bench_objectives.py jobs=2` (two multiruns side by side on 2 cores: wall times compare within a "
            "table only). `_hybrid1`: the row's student with the teacher taking its first step.\n\n")
    sections = []
    for task in [t for t in TASKS if t in results]:
        t64 = [r for r in results[task] if r["name"] == "teacher 64 steps"][0]["sliced_w2"]
        sections.append(markdown(task, results[task], THRESHOLD_X * t64))
    return {"objectives_gmm.md": head + "\n\n".join(sections) + "\n", "objectives_gmm_summary.md": summary(results)}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
