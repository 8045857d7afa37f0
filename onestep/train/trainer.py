"""The training loop: generator + frozen teacher + (optional) critic, alternating updates with TTUR.

``setup`` builds a run (accelerator, run folder, experiment, objective, networks, optimizers, resume state);
``train``'s loop then reads as the order of events per step:
    seed this step's RNG -> critic updates (objective.critic_updates times) -> one generator update
    -> EMA / targets -> bad-step count (guard.py) -> stats line (step_log.py) -> checkpoint -> periodic eval/samples
An update whose loss or gradients are non-finite on any rank has its gradients zeroed (guard.py).
Gradient accumulation (trainer.grad_accum = K): each update, critic and generator alike, backpropagates K
micro-batches of trainer.batch_size, each loss scaled by 1 / K, and steps once on the sum: the update of one batch of
K batch_size rows (data_parallel.py places every micro-batch's rows and draws), its gradients reduced once, after the
last micro-batch. Steps, TTUR, warm-ups, EMA, logs and checkpoints count updates, never micro-batches; checkpoints
fall between updates, so resume is unchanged.
Checkpoints (trainer.checkpoint_format): under FSDP every rank writes its own shards (dcp, nothing gathered), else the
main process writes whole tensors (safetensors); resume reads either into this run's layout (checkpoint.py).
Resume is "run the same command again": the run folder is the identity and the newest valid checkpoint
is picked up; every step reseeds from (seed, step), so an interrupted and resumed run is
bit-identical to an uninterrupted one. Under N processes (torchrun / accelerate launch) each takes its rows of
the global batch and of every per-sample draw (data_parallel.py): the run equals the 1-process run.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from omegaconf import DictConfig

from onestep import checkpoint, experiment, fsdp, progress
from onestep.core import Nets
from onestep.data.stills import still_sources
from onestep.denoisers.base import Denoiser, guided
from onestep.eval.evaluators import evaluated
from onestep.eval.report import compare, eval_inputs, write_report
from onestep.experiment import shape_student
from onestep.generator import Student
from onestep.networks import EMA, Networks
from onestep.objectives import make_objective
from onestep.objectives.base import Objective
from onestep.train.data_parallel import DataParallel
from onestep.train.guard import NonFiniteLoss, StepGuard, grad_norm  # noqa: F401  (NonFiniteLoss: the CLI's)
from onestep.train.interrupt import Interrupted, StopOnSignal
from onestep.train.phases import PhaseClock
from onestep.train.run_dir import prepare_run_dir, resume_state, undo_on_bad_input
from onestep.train.step_log import StepLog, append
from onestep.train.tracking import Tracker, accelerator_args
from onestep.validate import check_config


@dataclass
class Training:
    """What ``setup`` built: everything a training step reads."""
    cfg: DictConfig
    acc: Accelerator
    run_dir: Path
    show: bool  # progress output on this process (trainer.progress, main process)
    dp: DataParallel
    setup: experiment.Setup
    student: Student
    objective: Objective
    networks: Networks
    teacher: Denoiser  # the (guided) teacher view
    nets: Nets
    opt_g: torch.optim.Optimizer
    opt_c: torch.optim.Optimizer | None
    start: int = 0  # the first step to run (a resumed run: its checkpoint's step)
    bad_steps: int = 0  # bad steps before ``start`` (guard.py)


def setup(cfg, run_dir: str | Path | None = None) -> Training:
    """Accelerator, run folder, experiment, objective, networks, optimizers and the resume state of a run."""
    check_config(cfg)  # every key that needs no file, before the run folder exists
    tc = cfg.trainer
    # without CUDA, accelerate joins the processes of torchrun / accelerate launch (gloo) only when told cpu=True
    acc = Accelerator(mixed_precision=tc.mixed_precision, cpu=tc.cpu or not torch.cuda.is_available(),
                      **accelerator_args(tc.log_with, run_dir or cfg.run_dir))  # trainer.log_with's tracker
    run_dir = prepare_run_dir(cfg, run_dir, write=acc.is_main_process)
    show = tc.progress and acc.is_main_process
    dp = DataParallel(acc, tc.batch_size, tc.grad_accum)

    with acc.main_process_first(), progress.phase("teacher, data and evaluator", show):
        built = evaluated(cfg, experiment.build(cfg, run_dir, progress=show))  # derived files: rank 0 first
    gc = cfg.generator
    student = Student.from_config(built.teacher.schedule, gc)
    objective = make_objective(cfg.objective, student.train_sample)
    torch.manual_seed(cfg.seed + 1)  # extra modules start the same whether the teacher was trained or cached
    heads = objective.build_modules(built)
    if objective.data_streams():  # a second data stream (captioned stills), encoded once: rank 0 first
        with acc.main_process_first(), progress.phase(f"{cfg.objective.name} data", show):
            objective.set_data(still_sources(objective.data_streams(), built, experiment.cache_root(cfg), show))
    objective.set_run(heads, images_per_step=tc.batch_size * tc.grad_accum,
                      logged=lambda step: _due(step + 1, tc.log_every, tc.steps))  # (the loop's log_now)
    networks = Networks(cfg, built, critic="critic" in objective.networks, heads=heads,
                        targets=objective.targets(), device=acc.device,
                        shape=partial(shape_student, gc, objective=type(objective)), shard=fsdp.requested(cfg))
    if tc.compile:
        networks.compile(tc.compile_mode, eager=objective.jvp_networks)
    teacher = guided(networks.teacher, cfg.teacher.guidance)
    nets = networks.nets(teacher)
    with networks.whole("teacher"), acc.main_process_first(), progress.phase(f"{cfg.objective.name} prepare", show):
        objective.prepare(nets, checkpoint.read_run_weights(objective.run_weights()))  # (main process: teacher alone)
    if acc.is_main_process:
        print(networks.describe(), flush=True)

    opt_g = acc.prepare(_adamw(networks.params("generator"), tc.generator_optim))
    c_params = networks.params("critic")
    opt_c = acc.prepare(_adamw(c_params, tc.critic_optim)) if c_params else None
    t = Training(cfg, acc, run_dir, show, dp, built, student, objective, networks, teacher, nets, opt_g, opt_c)
    if tc.init_from:  # a two-stage schedule: the other run's weights, then this run's own checkpoint if it has one
        loaded = checkpoint.load_start(tc.init_from, networks.checkpointed(gathered=False))
        if acc.is_main_process:
            print(f"trainer.init_from: {', '.join(loaded)} from {tc.init_from}", flush=True)
    # loads weights (and, from a dcp checkpoint, the optimizers) in place, in this run's layout
    state = resume_state(run_dir, networks.checkpointed(gathered=False), tc.resume, acc, live=_live(t))
    if state is not None:
        t.start, t.bad_steps = state["step"], state.get("bad_steps", 0)
        if not state.get("optimizers_loaded"):
            fsdp.load_optimizer(opt_g, state["opt_generator"])  # (sliced into shards under FSDP)
            if opt_c is not None:
                fsdp.load_optimizer(opt_c, state["opt_critic"])
        if state.get("data") is not None:  # a streamed source's position (data=webdataset), this process's own
            positions = state["data"]  # (on another process count: any one of them, which refuses in one line)
            built.data.load_state_dict(positions[min(acc.process_index, len(positions) - 1)])
        if acc.is_main_process:
            print(f"resuming from step {t.start} (checkpoint {state['checkpoint']})", flush=True)
    return t


@undo_on_bad_input
def train(cfg, run_dir: str | Path | None = None, callbacks: tuple[Callable[[int, dict], None], ...] = ()) -> dict:
    t_begin = time.perf_counter()
    t = setup(cfg, run_dir)
    tc = cfg.trainer
    clock = PhaseClock(t.acc.device)  # time/<phase>_ms in stats.jsonl (phases.py)
    clock.watch(t.networks.teacher, "teacher")
    stop = StopOnSignal()  # Ctrl-C / SIGTERM: finish the step, checkpoint, stop (interrupt.py)
    guard = StepGuard(tc.max_bad_steps, t.bad_steps, stop.requested, t.acc.device)
    log = StepLog(t.acc, t.run_dir, cfg, t.start, clock, show=t.show, optimizers=(t.opt_g, t.opt_c), mean=t.dp.mean)
    seconds = {"setup": round(log.t0 - t_begin, 1), "resumed_at_step": t.start}

    with stop:
        for step in log:
            _seed(cfg.seed, step)
            logs: dict[str, torch.Tensor] = {}  # on the device; read once per log step (no host sync per value)
            for _ in range(t.objective.critic_updates):
                logs.update(_role_update(t, "critic", step, clock, guard))
            logs.update(_role_update(t, "generator", step, clock, guard))
            with clock("targets"):
                t.networks.update_targets()  # generator_ema and the objective's targets
            clock.step()
            guard.end_step()  # counts bad steps on the device; agrees on a stop signal

            done = step + 1
            log_now = _due(done, tc.log_every, tc.steps)
            save_now = _due(done, tc.checkpoint_every, tc.steps) or guard.stop
            if log_now or save_now:
                guard.check()  # stops the run after more than trainer.max_bad_steps bad steps in a row
            logs = log.step(done, logs, read=log_now, bad_steps=guard.total)
            if save_now:
                _save(t, done, guard.total, clock)
            _periodic(t, done, clock, log.track)  # evaluation / sample grid every trainer.eval_every / sample_every
            for cb in callbacks:
                cb(done, logs)
            if guard.stop and done < tc.steps:  # every rank, after the same step (guard.end_step)
                log.close(trackers=True)
                raise Interrupted(done, t.run_dir, stop.signum or signal.SIGTERM)
    log.close()
    seconds["distill"] = round(time.perf_counter() - log.t0, 1)
    return _final_evaluation(t, log.track, seconds)


def _due(done: int, every: int, last: int) -> bool:
    return done % every == 0 or done == last


def _role_update(t: Training, role: str, step: int, clock: PhaseClock, guard: StepGuard) -> dict[str, torch.Tensor]:
    """One update of ``role`` on fresh micro-batches (trainer.grad_accum of them); its logged values, prefixed
    (critic/..., gen/...), each the mean over the micro-batches."""
    loss, opt = (t.objective.critic_loss, t.opt_c) if role == "critic" else (t.objective.generator_loss, t.opt_g)
    with clock("data"):
        batches = t.dp.batches(t.setup.data, t.acc.device)
    logs: dict[str, torch.Tensor] = {}
    with clock(role):
        for k, batch in enumerate(batches):
            # FSDP reduce-scatters only the last micro-batch's backward, with the sum of all of theirs
            t.networks.sync_gradients(role, k == len(batches) - 1)
            with t.acc.autocast(), t.dp.draws(k):
                out = loss(t.nets, batch, step)
            t.acc.backward(out["loss"] / len(batches))  # the K B rows' mean: each micro-batch's is over B rows
            for name, v in out.items():
                logs[name] = logs.get(name, 0) + v.detach() / len(batches)
        _update(t.acc, t.networks, role, logs["loss"], opt, t.cfg.trainer.grad_clip, guard)
    prefix = "gen" if role == "generator" else role
    logs = {f"{prefix}/{k}": v for k, v in logs.items()}
    if hasattr(t.setup.data, "stats"):  # a streamed source's counters (data/skipped: samples that did not decode)
        logs |= {k: torch.tensor(v, device=t.acc.device) for k, v in t.setup.data.stats().items()}
    return logs


def _save(t: Training, done: int, bad_steps: int, clock: PhaseClock) -> None:
    keep, main = t.cfg.trainer.keep_checkpoints, t.acc.is_main_process
    with clock("checkpoint"):
        if _dcp_format(t.cfg):  # every rank writes its own shards; state.pt keeps the step counters
            small = {"step": done, "bad_steps": bad_steps, "data": _data_positions(t)}
            checkpoint.save_dcp(t.run_dir, done, _live(t), small, keep, main, t.acc.wait_for_everyone)
        else:  # every rank takes part (sharded states gather); the main process alone keeps them and writes
            states, train_state = t.networks.checkpointed(keep=main), _state(done, t.opt_g, t.opt_c, bad_steps, main)
            train_state["data"] = _data_positions(t)
            if main:
                checkpoint.save(t.run_dir, done, states, train_state, keep=keep)
        t.acc.wait_for_everyone()


def _dcp_format(cfg) -> bool:
    """Whether this run writes dcp checkpoints (trainer.checkpoint_format; auto: when training under FSDP)."""
    fmt = cfg.trainer.checkpoint_format
    return fmt == "dcp" or (fmt == "auto" and fsdp.requested(cfg) and fsdp.world_size() > 1)


def _live(t: Training) -> checkpoint.Live:
    # the optimizers accelerate wraps: dcp fills a fresh one's moments by a zero step, which must not move the fp16
    # GradScaler's counters
    opts = {"generator": t.opt_g, **({"critic": t.opt_c} if t.opt_c is not None else {})}
    return t.networks.live({role: getattr(opt, "optimizer", opt) for role, opt in opts.items()})


def _periodic(t: Training, done: int, clock: PhaseClock, track: Tracker) -> None:
    """Every trainer.eval_every steps (but the last: the final evaluation follows) an evaluation of the EMA student
    (evals.jsonl), every trainer.sample_every steps a sample grid (samples_<step>.png)."""
    tc, main, ema = t.cfg.trainer, t.acc.is_main_process, t.networks.unwrapped(EMA)
    evaluate = tc.eval_every and done % tc.eval_every == 0 and done != tc.steps
    plot = tc.sample_every and done % tc.sample_every == 0
    if not (evaluate or plot):
        return
    with t.networks.whole(EMA), clock("eval"):  # (every rank: the EMA role is the sharded generator when ema_decay=0)
        if main and evaluate:
            record = {"step": done, **_eval_student(t.setup, t.student, ema, t.cfg.eval)}
            append(t.run_dir / "evals.jsonl", record)
            track.evals(record)
        if main and plot:
            _plot_samples(t.setup, t.student, ema, t.run_dir / f"samples_{done:08d}.png")
            track.samples(done, t.run_dir / f"samples_{done:08d}.png")


def _final_evaluation(t: Training, track: Tracker, seconds: dict) -> dict:
    """The final comparison of student and teacher (results.md, metrics.json, samples.png) on the main process."""
    cfg, setup, ema = t.cfg, t.setup, t.networks.unwrapped(EMA)
    t_eval = time.perf_counter()
    with t.networks.whole("teacher", EMA):  # every rank gathers sharded ones; the main process evaluates alone
        if not t.acc.is_main_process:
            return {}
        rows, samples = compare(setup, t.student, ema, t.teacher, cfg.eval, progress=t.show)
    seconds["evaluate"] = round(time.perf_counter() - t_eval, 1)
    # wall seconds of this process (a resumed run counts from resumed_at_step)
    table = write_report(t.run_dir, rows, {"steps": cfg.trainer.steps, "objective": cfg.objective.name,
                                           "seconds": seconds, "headline": setup.evaluator.headline},
                         note=getattr(setup.evaluator, "what", None))
    track.finish(cfg.trainer.steps, rows, table)
    if cfg.eval.plot:
        pick = [f"teacher {s} step{'s' if s > 1 else ''}" for s in (1, max(cfg.eval.teacher_steps))] + \
               [k for k in samples if k.startswith("student")][:1]
        setup.evaluator.plot(t.run_dir / "samples.png", {k: samples[k] for k in dict.fromkeys(pick) if k in samples})
    print(f"\n{table}\n\nrun folder: {t.run_dir}")
    return {"rows": rows, "run_dir": str(t.run_dir), "networks": t.networks, "optimizers": (t.opt_g, t.opt_c)}


def _adamw(params, oc):
    return torch.optim.AdamW(params, lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay)


def _seed(seed: int, step: int) -> None:
    # the same on every rank: each takes its rows of draws made for the whole global batch (data_parallel.py)
    torch.manual_seed((seed * 1_000_003 + step) * 64)


def _update(acc, networks, what, loss, opt, clip, guard: StepGuard) -> None:
    """Reduce + clip + step on the accumulated gradients (``loss``: the update's, for the guard); an update whose
    loss or gradients are non-finite on any rank steps on zeros."""
    networks.reduce_gradients(what)
    params = networks.params(what)
    if networks.sharded:  # FSDP shards and replicated heads in one norm
        norm = fsdp.clip_grad_norm_(params, clip)
    else:
        norm = acc.clip_grad_norm_(params, clip) if clip > 0 else grad_norm(params)
    if acc.scaler is not None:  # fp16: the GradScaler itself skips overflowing steps (and lowers its scale)
        norm = torch.zeros(())
    guard.screen(what, loss, norm, params)  # non-finite on any rank: the gradients are zeroed (device)
    opt.step()
    opt.zero_grad(set_to_none=True)


@torch.no_grad()
def _student_samples(setup, student, net, n: int):
    """n samples of the student at its training step count, from the fixed evaluation noise (seed 0)."""
    noise, cond = eval_inputs(setup, n, 0)
    device = next(net.parameters()).device
    return student.sample(net, noise.to(device), None if cond is None else cond.to(device)).cpu(), cond


def _eval_student(setup, student, net, eval_cfg, max_samples: int = 2000) -> dict:
    """Periodic check of the EMA student at its training step count (a capped sample count)."""
    x, cond = _student_samples(setup, student, net, min(eval_cfg.num_samples, max_samples))
    return {k: v for k, v in setup.evaluator.metrics(x, cond).items() if not isinstance(v, list)}


def _state(step, opt_g, opt_c, bad_steps, keep: bool = True) -> dict:
    # no RNG state: every step reseeds from (seed, step). Plain tensors and numbers only (weights_only load)
    # (every rank builds it: the moments of FSDP shards are gathered; kept by the writing rank alone)
    s = {"step": step, "opt_generator": fsdp.gather(opt_g.state_dict(), keep), "bad_steps": bad_steps}
    if opt_c is not None:
        s["opt_critic"] = fsdp.gather(opt_c.state_dict(), keep)
    return s


def _data_positions(t: Training) -> list[dict] | None:
    """Every process's position in a resumable stream (data=webdataset), in rank order; None for in-memory data
    (their batches are a function of (seed, step) alone)."""
    if not hasattr(t.setup.data, "state_dict"):
        return None
    mine = t.setup.data.state_dict()
    if t.acc.num_processes == 1:
        return [mine]
    every: list[dict | None] = [None] * t.acc.num_processes
    torch.distributed.all_gather_object(every, mine)
    return every


def _plot_samples(setup, student, net, path):
    x, cond = _student_samples(setup, student, net, 2000)
    setup.evaluator.plot(path, {"student (EMA)": (x, cond)})

