"""`onestep export`: a run folder's student -> a diffusers pipeline folder that plain diffusers loads and runs.

    <out>/model_index.json, unet/, vae/, text_encoder*/, tokenizer*/, scheduler/   (SD-family: the teacher's
                                         pipeline class with the student's UNet and a stock scheduler)
    <out>/pipeline.py                    (class-conditional students: diffusers has no such pipeline)
    <out>/pytorch_lora_weights.safetensors   (lora_only=true: the adapter; unet/ is then the teacher's)
    <out>/model.safetensors              (SD-family: one original-layout (LDM) file for from_single_file)
    <out>/onestep_export.json            {"pipeline_class", "call": {...}, "custom_pipeline", "lora", ...}
    <out>/README.md                      model card: the call, the run's measured metrics, its resolved config

How the student's sampling maps onto a stock scheduler (checked to 1e-4 against `onestep sample` in a process
that cannot import onestep, tests/test_export.py):
  renoise students (DMD2, consistency): LCMScheduler with original_inference_steps = num_train_timesteps, whose
      k-step schedule is the student's integer list (999, 749, 499, 249 for k = 4); its x0 from the UNet's own
      prediction type, its boundary c_skip / c_out (timestep_scaling 10) = the student's (consistency students
      use exactly LCM's boundary on SD tables; for the others c_skip < 1e-7 at t >= 249), re-noising
      x = sqrt(abar_s) x0 + sqrt(1 - abar_s) z with z drawn from the caller's generator;
  ddim students: DDIMScheduler (the family's ``ddim_scheduler``: CogVideoXDDIMScheduler for CogVideoX's SNR-shifted
      table), "trailing" spacing, set_alpha_to_one (k must divide num_train_timesteps);
  renoise students on a table LCMScheduler cannot compute from its config keys (CogVideoX's snr_shift_scale): the
      same LCMScheduler on the table's own betas (trained_betas);
  class-conditional students on a continuous VP schedule: the folder's own pipeline.py (class_pipeline.py);
  flow students (SD3, Flux, Sana): FlowMatchEulerDiscreteScheduler on the student's sigmas; where the pipeline's
      call takes no sigmas (WanPipeline), the same scheduler's own k-step grid, which must be the student's t-list.
Every student starts from x = z (unit Gaussian) at t_max, as diffusers does (Schedule.prior_std).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

from onestep import teachers
from onestep.denoisers.consistency import LCM_TIMESTEP_SCALING, ConsistencyBoundary
from onestep.errors import ConfigError
from onestep.export.weights import lora_state_dict, plain_model, student_model
from onestep.objectives import objective_class
from onestep.runs import Run

EXPORT_FILE = "onestep_export.json"
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
CLASS_PIPELINE = "FewStepClassPipeline"


def prepare_out(out, overwrite: bool) -> Path:
    if not out:
        raise ConfigError("out is not set; pass out=<folder to write the pipeline to>")
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out='{out}' is a file; pass out=<folder>")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ConfigError(f"out='{out}' is not empty; pass overwrite=true to replace it, or another out=")
        if not (path / EXPORT_FILE).is_file():
            raise ConfigError(f"out='{out}' is not empty and is not a onestep export (no {EXPORT_FILE}); "
                              "refusing to delete it even with overwrite=true: pass another out=")
    return path


def student_steps(run: Run) -> tuple[list[float], str]:
    """(the student's t-list, its sampler), checked to be something a pipeline can start the way diffusers does."""
    student = run.student()
    if student.t_start < run.setup.teacher.schedule.t_max:
        raise ConfigError("the student starts at generator.sigma_init below t_max; a diffusers pipeline starts from "
                          "pure noise at t_max, so this student cannot be exported as it was trained")
    return student.ts.tolist(), student.method


def _sd_scheduler(run: Run, teacher_folder: Path, ts: list[float], method: str, boundary: bool):
    """A stock scheduler (from the teacher's scheduler config: betas, table size) that runs the student's
    sampling, and the call's step arguments."""
    import diffusers
    from diffusers import LCMScheduler

    teacher_config = dict(LCMScheduler.load_config(str(teacher_folder), subfolder="scheduler"))

    sched = run.setup.teacher.schedule
    n = sched.num_steps
    idx = [t * (n - 1) for t in ts]
    if any(abs(i - round(i)) > 1e-6 for i in idx):
        raise ConfigError(f"the student's t-list {ts} is not on integer timesteps of the {n}-step table; "
                          "a diffusers scheduler runs integer timesteps only (use generator.steps, not generator.ts)")
    idx = [int(round(i)) for i in idx]
    k = len(idx)
    prediction = PREDICTION_TYPES[run.setup.teacher.prediction]
    common = {"prediction_type": prediction, "clip_sample": False, "thresholding": False}
    if method == "renoise":
        if sched.snr_shift_scale != 1.0 or sched.zero_terminal_snr:
            # LCMScheduler has no SNR shift (and rescales betas, not CogVideoX's shifted alphas_cumprod): it gets the
            # table itself as its betas
            abar = sched.alphas_cumprod
            betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
            teacher_config.update(trained_betas=betas.tolist(), rescale_betas_zero_snr=False)
        scheduler = LCMScheduler.from_config(teacher_config, original_inference_steps=n,
                                             timestep_scaling=LCM_TIMESTEP_SCALING, **common)
        scheduler.set_timesteps(k)
        call = {"num_inference_steps": k}
        if scheduler.timesteps.tolist() != idx:
            call = {"timesteps": idx}
        return scheduler, call
    if boundary:
        raise ConfigError("a consistency-boundary student samples with generator.method=renoise (LCMScheduler); "
                          "ddim students export without generator.consistency_boundary")
    name = teachers.family(run.cfg.teacher.kind).ddim_scheduler
    scheduler = getattr(diffusers, name).from_config(teacher_config, timestep_spacing="trailing",
                                                     set_alpha_to_one=True, steps_offset=0, **common)
    scheduler.set_timesteps(k)
    if n % k or scheduler.timesteps.tolist() != idx:
        raise ConfigError(f"a {k}-step ddim student's timesteps {idx} are not {name}'s trailing "
                          f"{scheduler.timesteps.tolist()}; use a step count that divides {n}")
    return scheduler, {"num_inference_steps": k}


def _flow_scheduler(run: Run, teacher_folder: Path, ts: list[float], method: str, boundary: bool):
    """FlowMatchEulerDiscreteScheduler running the student's own sigmas (no shift: the t-list already has it).
    renoise = its stochastic_sampling step x = (1 - s') x0 + s' z; ddim = its Euler step, which on a rectified flow
    is DDIM exactly."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if boundary:
        raise ConfigError("generator.consistency_boundary students on a flow teacher have no stock scheduler; "
                          "export students trained without it")
    config = dict(FlowMatchEulerDiscreteScheduler.load_config(str(teacher_folder), subfolder="scheduler"))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        config, shift=1.0, use_dynamic_shifting=False, shift_terminal=None, invert_sigmas=False,
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        stochastic_sampling=method == "renoise")
    return scheduler, {"sigmas": [float(t) for t in ts], "num_inference_steps": len(ts)}


def _flow_steps_scheduler(run: Run, teacher_folder: Path, ts: list[float], method: str, boundary: bool):
    """FlowMatchEulerDiscreteScheduler for pipelines whose call takes no sigmas (WanPipeline runs
    ``scheduler.set_timesteps(k)``): at the teacher's shift, its own k-step grid must be the student's t-list (the
    steps as in _flow_scheduler); anything else is refused with the t-list that would export. The grid starts at
    sigma 1 where the student starts at t_max = 1 - 1e-4, both from pure noise z: the first step's network sees
    timestep 1000 instead of 999.9 and takes x0 = z - u instead of z - 0.9999 u, a difference of order 1e-4 |u|."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if boundary:
        raise ConfigError("generator.consistency_boundary students on a flow teacher have no stock scheduler; "
                          "export students trained without it")
    shift = run.setup.teacher.schedule.shift
    config = dict(FlowMatchEulerDiscreteScheduler.load_config(str(teacher_folder), subfolder="scheduler"))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=int(config.get("num_train_timesteps", 1000)), shift=shift,
        stochastic_sampling=method == "renoise")
    k = len(ts)
    scheduler.set_timesteps(k)
    grid = scheduler.sigmas[:-1].tolist()
    # its first sigma is 1, where a student starts from pure noise at the schedule's t_max (Schedule.prior_std)
    if any(abs(a - b) > 1e-6 for a, b in zip(grid[1:], ts[1:])):
        fam = teachers.family(run.cfg.teacher.kind)
        fit = [run.setup.teacher.schedule.t_max, *grid[1:]]
        raise ConfigError(f"{fam.pipeline(run.cfg.teacher.kind)} calls scheduler.set_timesteps({k}) and takes no "
                          f"sigmas: the stock FlowMatchEulerDiscreteScheduler (shift {shift:g}) steps at t = "
                          f"[{', '.join(f'{t:.6g}' for t in grid)}], not at the student's t-list "
                          f"[{', '.join(f'{t:.6g}' for t in ts)}]; train it with generator.ts=[{', '.join(map(repr, fit))}] "
                          "to export it")
    return scheduler, {"num_inference_steps": k}


def export_text_to_image(run: Run, out: Path, lora_only: bool) -> dict:
    """SD1.x/2.x, SDXL, SD3, Flux, Sana, Wan students: the teacher's pipeline class with the student's network(s)
    and a stock scheduler that reproduces its sampling."""
    import diffusers

    tc = run.cfg.teacher
    fam = teachers.family(tc.kind)
    component, pipeline = fam.network, fam.pipeline(tc.kind)
    cls = getattr(diffusers, pipeline)
    model, adapter = student_model(run.generator)
    # the pipeline components the student fills: one network, or the family's several (Wan 2.2's two experts)
    components = fam.student_components(getattr(run.generator, "net", run.generator)) or {component: model}
    if lora_only and len(components) > 1:
        raise ConfigError(f"lora_only=true: the student holds {len(components)} networks ({', '.join(components)}) "
                          "and diffusers' load_lora_weights loads one; export the merged student (lora_only=false)")
    boundary = isinstance(getattr(run.generator, "net", None), ConsistencyBoundary)
    ts, method = student_steps(run)
    teacher_folder = Path(tc.path)
    extra = fam.pipeline_kwargs(tc.kind)
    scheduler, call = SCHEDULERS[fam.export_scheduler](run, teacher_folder, ts, method, boundary)
    lora = None
    if lora_only:
        if adapter is None:
            raise ConfigError("lora_only=true needs a LoRA student (generator.lora.rank); this run trained a full copy")
        weights, lora = lora_state_dict(model, adapter)
        pipe = cls.from_pretrained(teacher_folder, scheduler=scheduler, torch_dtype=torch.float32, **extra)
    else:
        pipe = cls.from_pretrained(teacher_folder, scheduler=scheduler, torch_dtype=torch.float32,
                                   **{name: plain_model(m, adapter) for name, m in components.items()}, **extra)
    pipe.save_pretrained(out, safe_serialization=True)
    if lora_only:
        cls.save_lora_weights(out, **{f"{component}_lora_layers": weights,
                                      f"{component}_lora_adapter_metadata": dict(lora)})
    size = run.setup.teacher.data_shape[-1] * run.setup.codec.downsample
    net = getattr(run.generator, "net", run.generator)
    # guidance-distilled Flux takes its scale as an input: the student keeps the one it was trained with
    guidance = float(getattr(net, "guidance", 1.0)) if getattr(net, "embedded_guidance", False) else 1.0
    call.update({"guidance_scale": guidance, "height": size, "width": size, **fam.call_extras(tc)})
    info = {"pipeline_class": pipeline, "call": call, "lora": lora, "prompted": True}
    if len(run.setup.teacher.data_shape) == 4:  # video pipelines return .frames, not .images
        info["video"] = True
    if fam.reseed_global and method == "renoise":  # (any step count: callers may ask for more steps)
        info["reseed_global"] = True
    return info


#: Family.export_scheduler -> (run, teacher folder, t-list, method, boundary) -> (scheduler, call arguments)
SCHEDULERS = {"table": _sd_scheduler, "flow": _flow_scheduler, "flow_steps": _flow_steps_scheduler}


def _class_pipeline_module():
    path = Path(__file__).with_name("class_pipeline.py")
    spec = importlib.util.spec_from_file_location("onestep_class_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


def export_class(run: Run, out: Path, lora_only: bool) -> dict:
    from onestep.schedules import VPCosine, VPLinear

    if lora_only:
        raise ConfigError("lora_only=true is for SD-family students; a class-conditional student exports merged")
    model, adapter = student_model(run.generator)
    if isinstance(getattr(run.generator, "net", None), ConsistencyBoundary):
        raise ConfigError("a consistency-boundary class-conditional student has no exported pipeline yet; export "
                          "students trained without generator.consistency_boundary")
    ts, method = student_steps(run)
    teacher = run.setup.teacher
    sched = teacher.schedule
    if isinstance(sched, VPCosine):
        params = {"schedule": "vp_cosine", "cosine_s": sched.s}
    elif isinstance(sched, VPLinear):
        params = {"schedule": "vp_linear", "beta_min": sched.b0, "beta_max": sched.b1}
    else:
        raise ConfigError(f"the class-conditional pipeline computes vp_cosine / vp_linear schedules; this teacher "
                          f"uses {sched.name}")
    module, source = _class_pipeline_module()
    pipe = getattr(module, CLASS_PIPELINE)(
        unet=plain_model(model, adapter), t_min=sched.t_min, t_max=sched.t_max,
        prediction_type=PREDICTION_TYPES[teacher.prediction], timestep_scale=float(teacher.timestep_scale),
        sampler=method, num_classes=int(teacher.num_classes), num_inference_steps=len(ts), **params)
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.copyfile(source, out / "pipeline.py")
    return {"pipeline_class": CLASS_PIPELINE, "custom_pipeline": True,
            "call": {"num_inference_steps": len(ts)}, "lora": None, "prompted": False}


def export(run: Run, out, *, overwrite: bool = False, lora_only: bool = False, allow_unfinished: bool = False,
           single_file: bool = True) -> Path:
    if not run.finished and not allow_unfinished:
        raise ConfigError(f"run '{run.path}' stopped at step {run.step} of trainer.steps={run.cfg.trainer.steps}; "
                          "finish it (rerun its onestep train command) or pass allow_unfinished=true to export "
                          "the latest checkpoint")
    routes = objective_class(run.cfg.objective.name).export_refusal(run.cfg.generator)
    if routes:  # the objective shaped a generator that routes between networks
        raise ConfigError(f"{routes}, which no diffusers pipeline holds; use its run folder instead (onestep sample "
                          f"run_dir={run.path} for images, onestep bench bench.runs=[...])")
    out = prepare_out(out, overwrite)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kind = run.cfg.teacher.kind
    fam = teachers.family(kind)
    if fam.export_scheduler == "class":
        info = export_class(run, tmp, lora_only)
    elif fam.export_scheduler in SCHEDULERS:
        info = export_text_to_image(run, tmp, lora_only)
        if single_file and not lora_only and kind in fam.single_file:
            from onestep.export.single_file import write_single_file

            info["single_file"] = write_single_file(tmp, kind).name
    else:
        exportable = sorted(k for k in teachers.kinds() if teachers.family(k).export_scheduler)
        raise ConfigError(f"teacher.kind '{kind}' has no diffusers pipeline to export to; export supports "
                          f"{exportable}")
    info.update({"onestep_run": str(run.path.resolve()), "step": run.step, "finished": run.finished,
                 "image_size": run.setup.teacher.data_shape[-1] * (run.setup.codec.downsample if run.setup.codec else 1)})
    (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    (tmp / "README.md").write_text(model_card(run, info), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def usage_code(info: dict, folder: str = "<export folder>") -> str:
    """The exact Python that loads and runs the export with plain diffusers."""
    load = f"DiffusionPipeline.from_pretrained({folder!r}" + (f", custom_pipeline={folder!r}, trust_remote_code=True)" if info.get("custom_pipeline") else ")")
    lines = ["import torch", "from diffusers import DiffusionPipeline", "", f"pipe = {load}"]
    if info.get("lora"):
        lines.append(f"pipe.load_lora_weights({folder!r})")
    if info.get("reseed_global"):
        lines.append("torch.manual_seed(0)  # the pipeline draws its re-noising steps from torch's global RNG")
    args = ", ".join(f"{k}={v!r}" for k, v in info["call"].items())
    first = "prompt=['a handwritten seven'] * 4" if info.get("prompted") else "batch_size=4"
    output = "frames" if info.get("video") else "images"
    lines.append(f"{output} = pipe({first}, {args}, generator=torch.Generator('cpu').manual_seed(0)).{output}")
    return "\n".join(lines)


def model_card(run: Run, info: dict) -> str:
    results = run.path / "results.md"
    metrics = results.read_text(encoding="utf-8").strip() if results.is_file() else \
        "(the run wrote no results.md: evaluate it with onestep bench)"
    config = OmegaConf.to_yaml(run.cfg, resolve=True)
    state = "finished" if run.finished else f"UNFINISHED: step {run.step} of {run.cfg.trainer.steps}"
    return (f"# Few-step student exported by onestep\n\n"
            f"Distilled with `onestep train` (run `{run.path.name}`, checkpoint step {run.step}, {state}); "
            f"pipeline `{info['pipeline_class']}`.\n\n## Use with diffusers\n\n```python\n{usage_code(info, '.')}\n```\n\n"
            f"`onestep_export.json` holds the call's keyword arguments. `onestep sample run_dir=<this folder>` runs "
            f"the same call.\n\n## Measured (the run's evaluation)\n\n{metrics}\n\n"
            f"## Training config (resolved)\n\n```yaml\n{config}```\n")
