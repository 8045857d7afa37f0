"""The training loop: generator + frozen teacher + (optional) critic, alternating updates with TTUR.

Order of events per step (reads top to bottom in ``train``):
    seed this step's RNG -> critic updates (objective.critic_updates times) -> one generator update
    -> EMA -> bad-step count (guard.py) -> stats line -> checkpoint -> periodic eval/samples
An update whose loss or gradients are non-finite on any rank has its gradients zeroed (guard.py).
Resume is "run the same command again": the run folder is the identity and the newest valid checkpoint
is picked up; every step reseeds from (seed, step), so an interrupted and resumed run is
bit-identical to an uninterrupted one. Under N processes (torchrun / accelerate launch) each takes its rows of
the global batch and of every per-sample draw (data_parallel.py): the run equals the 1-process run.
"""

from __future__ import annotations

import json
import signal
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

from onestep import checkpoint, experiment, fsdp, progress
from onestep.denoisers.base import guided
from onestep.eval.evaluators import evaluated
from onestep.eval.report import compare, eval_inputs, write_report
from onestep.experiment import shape_student
from onestep.generator import Student
from onestep.networks import EMA, Networks
from onestep.objectives import make_objective
from onestep.train.data_parallel import DataParallel
from onestep.train.guard import NonFiniteLoss, StepGuard, grad_norm  # noqa: F401  (NonFiniteLoss: the CLI's)
from onestep.train.interrupt import Interrupted, StopOnSignal
from onestep.train.phases import PhaseClock
from onestep.train.run_dir import prepare_run_dir, resume_state, undo_on_bad_input
from onestep.train.tracking import Tracker, accelerator_args
from onestep.validate import check_config


@undo_on_bad_input
def train(cfg, run_dir: str | Path | None = None, callbacks: tuple[Callable[[int, dict], None], ...] = ()) -> dict:
    t_begin = time.perf_counter()
    check_config(cfg)  # every key that needs no file, before the run folder exists
    tc = cfg.trainer
    # without CUDA, accelerate joins the processes of torchrun / accelerate launch (gloo) only when told cpu=True
    acc = Accelerator(mixed_precision=tc.mixed_precision, cpu=tc.cpu or not torch.cuda.is_available(),
                      **accelerator_args(tc.log_with, run_dir or cfg.run_dir))  # trainer.log_with's tracker
    run_dir = prepare_run_dir(cfg, run_dir, write=acc.is_main_process)
    show = tc.progress and acc.is_main_process
    dp = DataParallel(acc, tc.batch_size)

    torch.manual_seed(cfg.seed)  # network inits and anything else drawn while building the experiment
    with acc.main_process_first(), progress.phase("teacher, data and evaluator", show):
        setup = evaluated(cfg, experiment.build(cfg, run_dir, progress=show))  # derived files: rank 0 first
    gc = cfg.generator
    student = Student(setup.teacher.schedule, gc.steps, gc.ts, gc.method, gc.sigma_init)
    objective = make_objective(cfg.objective, student.train_sample)
    objective.images_per_step = tc.batch_size
    torch.manual_seed(cfg.seed + 1)  # extra modules start the same whether the teacher was trained or cached
    heads = objective.build_modules(setup)
    objective.trains_critic_modules = any(role == "critic" for _, role in heads.values())
    networks = Networks(cfg, setup, critic="critic" in objective.networks, heads=heads,
                        targets=objective.targets(), device=acc.device, shape=partial(shape_student, gc),
                        shard=fsdp.requested(cfg))
    if tc.compile:
        networks.compile(tc.compile_mode, eager=objective.jvp_networks)
    teacher = guided(networks.teacher, cfg.teacher.guidance)
    nets = networks.nets(teacher)
    with networks.whole("teacher"), acc.main_process_first(), progress.phase(f"{cfg.objective.name} prepare", show):
        objective.prepare(nets)  # (the main process may run the teacher alone)
    if acc.is_main_process:
        print(networks.describe(), flush=True)

    opt_g = acc.prepare(_adamw(networks.params("generator"), tc.generator_optim))
    c_params = networks.params("critic")
    opt_c = acc.prepare(_adamw(c_params, tc.critic_optim)) if c_params else None
    state = resume_state(run_dir, networks.checkpointed(), tc.resume, acc)  # loads weights in place
    start = 0
    if state is not None:
        start = state["step"]
        fsdp.load_optimizer(opt_g, state["opt_generator"])  # (sliced into shards under FSDP)
        if opt_c is not None:
            fsdp.load_optimizer(opt_c, state["opt_critic"])
        if acc.is_main_process:
            print(f"resuming from step {start} (checkpoint {state['checkpoint']})", flush=True)
    ema = networks.unwrapped(EMA)
    track = Tracker(acc, run_dir, cfg, start)  # mirrors the JSONL lines and sample grids (tracking.py)

    stats_file = Path(run_dir) / "stats.jsonl"
    bar = progress.bar(range(start, tc.steps), initial=start, total=tc.steps, desc="distill", disable=not show)
    clock = PhaseClock(acc.device)  # time/<phase>_ms in stats.jsonl (phases.py)
    clock.watch(networks.teacher, "teacher")
    stop = StopOnSignal()  # Ctrl-C / SIGTERM: finish the step, checkpoint, stop (interrupt.py)
    guard = StepGuard(tc.max_bad_steps, state.get("bad_steps", 0) if state else 0, stop.requested, acc.device)
    t0 = t_rate = time.perf_counter()
    seconds = {"setup": round(t0 - t_begin, 1), "resumed_at_step": start}
    def role_update(role: str, loss, opt, step: int) -> dict[str, torch.Tensor]:
        """One update of ``role`` on a fresh batch; its logged values, prefixed (critic/..., gen/...)."""
        with clock("data"):
            batch = dp.batch(setup.data, tc.batch_size, acc.device)
        with clock(role):
            with acc.autocast(), dp.draws():
                out = loss(nets, batch, step)
            _update(acc, networks, role, out, opt, tc.grad_clip, guard)
        prefix = "gen" if role == "generator" else role
        return {f"{prefix}/{k}": v.detach() for k, v in out.items()}

    with stop:
        for step in bar:
            _seed(cfg.seed, step)
            logs: dict[str, torch.Tensor] = {}  # on the device; read once per log step (no host sync per value)
            for _ in range(objective.critic_updates):
                logs.update(role_update("critic", objective.critic_loss, opt_c, step))
            logs.update(role_update("generator", objective.generator_loss, opt_g, step))
            with clock("targets"):
                networks.update_targets()
            clock.step()
            guard.end_step()  # counts bad steps on the device; agrees on a stop signal

            done = step + 1
            main = acc.is_main_process
            if done == start + 1:  # the first step allocates and warms up: the rate and ETA count from the next
                t_rate = time.perf_counter()
                progress.restart_clock(bar)
                if show and t_rate - t0 > 10:
                    print(f"\nfirst step: {t_rate - t0:.0f} s (one-time allocation and warm-up); the rate counts "
                          "from the second", flush=True)
            log_now = done % tc.log_every == 0 or done == tc.steps
            if log_now or done % tc.checkpoint_every == 0 or guard.stop:
                guard.check()  # stops the run after more than trainer.max_bad_steps bad steps in a row
            if log_now:
                logs, phases = dp.mean(_read(logs)), clock.read()
            if main and (done % tc.log_every == 0 or done == tc.steps):
                rate = (done - start - 1) / (time.perf_counter() - t_rate) if done > start + 1 else 1 / (t_rate - t0)
                bar.set_postfix({k.split("/")[0][0] + ":" + k.split("/")[1]: f"{v:.3g}" for k, v in logs.items()
                                 if k.endswith("loss")} | {"it/s": f"{rate:.1f}"}, refresh=False)
                with clock("log"):
                    record = {"step": done, "it_per_s": rate, "bad_steps": guard.total, **logs, **phases}
                    _append(stats_file, record)
                    track.stats(record, opt_g, opt_c)
            if done % tc.checkpoint_every == 0 or done == tc.steps or guard.stop:
                with clock("checkpoint"):  # every rank takes part (sharded states gather); the main process writes
                    states, train_state = networks.checkpointed(), _state(done, opt_g, opt_c, guard.total)
                    if main:
                        checkpoint.save(run_dir, done, states, train_state, keep=tc.keep_checkpoints)
                    acc.wait_for_everyone()
            evaluate = tc.eval_every and done % tc.eval_every == 0 and done != tc.steps
            plot = tc.sample_every and done % tc.sample_every == 0
            if evaluate or plot:
                with networks.whole(EMA), clock("eval"):  # (every rank: the EMA role is the sharded generator when ema_decay=0)
                    if main and evaluate:
                        record = {"step": done, **_eval_student(setup, student, ema, cfg.eval)}
                        _append(Path(run_dir) / "evals.jsonl", record)
                        track.evals(record)
                    if main and plot:
                        _plot_samples(setup, student, ema, run_dir / f"samples_{done:08d}.png")
                        track.samples(done, run_dir / f"samples_{done:08d}.png")
            for cb in callbacks:
                cb(done, logs)
            if guard.stop and done < tc.steps:  # every rank, after the same step (guard.end_step)
                bar.close()
                track.close()
                raise Interrupted(done, run_dir, stop.signum or signal.SIGTERM)
    bar.close()

    t_eval = time.perf_counter()
    seconds["distill"] = round(t_eval - t0, 1)
    with networks.whole("teacher", EMA):  # every rank gathers sharded ones; the main process evaluates alone
        if not acc.is_main_process:
            return {}
        rows, samples = compare(setup, student, ema, teacher, cfg.eval, progress=show)
    seconds["evaluate"] = round(time.perf_counter() - t_eval, 1)
    # wall seconds of this process (a resumed run counts from resumed_at_step)
    table = write_report(run_dir, rows, {"steps": tc.steps, "objective": cfg.objective.name, "seconds": seconds,
                                         "headline": setup.evaluator.headline},
                         note=getattr(setup.evaluator, "what", None))
    track.finish(tc.steps, rows, table)
    if cfg.eval.plot:
        pick = [f"teacher {s} step{'s' if s > 1 else ''}" for s in (1, max(cfg.eval.teacher_steps))] + \
               [k for k in samples if k.startswith("student")][:1]
        setup.evaluator.plot(run_dir / "samples.png", {k: samples[k] for k in dict.fromkeys(pick) if k in samples})
    print(f"\n{table}\n\nrun folder: {run_dir}")
    return {"rows": rows, "run_dir": str(run_dir), "networks": networks, "optimizers": (opt_g, opt_c)}


def _adamw(params, oc):
    return torch.optim.AdamW(params, lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay)


def _seed(seed: int, step: int) -> None:
    # the same on every rank: each takes its rows of draws made for the whole global batch (data_parallel.py)
    torch.manual_seed((seed * 1_000_003 + step) * 64)


def _update(acc, networks, what, out, opt, clip, guard: StepGuard) -> None:
    """Backward + clip + step; an update whose loss or gradients are non-finite on any rank steps on zeros."""
    acc.backward(out["loss"])
    networks.reduce_gradients(what)
    params = networks.params(what)
    if networks.sharded:  # FSDP shards and replicated heads in one norm
        norm = fsdp.clip_grad_norm_(params, clip)
    else:
        norm = acc.clip_grad_norm_(params, clip) if clip > 0 else grad_norm(params)
    if acc.scaler is not None:  # fp16: the GradScaler itself skips overflowing steps (and lowers its scale)
        norm = torch.zeros(())
    guard.screen(what, out["loss"], norm, params)  # non-finite on any rank: the gradients are zeroed (device)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _read(logs: dict) -> dict[str, float]:
    """The logged values as floats, read from the device in one transfer."""
    if not logs:
        return {}
    values = torch.stack([torch.as_tensor(v).detach().reshape(()).to(torch.float64) for v in logs.values()])
    return dict(zip(logs, values.tolist()))


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


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


def _state(step, opt_g, opt_c, bad_steps) -> dict:
    # no RNG state: every step reseeds from (seed, step). Plain tensors and numbers only (weights_only load)
    # (every rank builds it: the moments of FSDP shards are gathered)
    s = {"step": step, "opt_generator": fsdp.gather(opt_g.state_dict()), "bad_steps": bad_steps}
    if opt_c is not None:
        s["opt_critic"] = fsdp.gather(opt_c.state_dict())
    return s


def _plot_samples(setup, student, net, path):
    x, cond = _student_samples(setup, student, net, 2000)
    setup.evaluator.plot(path, {"student (EMA)": (x, cond)})

