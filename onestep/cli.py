"""`onestep <command> [hydra overrides...]`.

    onestep train                                  # the embedded default experiment
    onestep train experiment=gmm_dmd2 trainer.steps=3000 objective.ttur=5
    onestep train -m objective.ttur=1,5            # Hydra multirun
    onestep train --cfg job                        # print the composed config
    onestep bench bench.runs=[runs/gmm_dmd2/a]     # quality vs NFE: teacher samplers and student checkpoints
    onestep sample run_dir=<run or export folder> num=16 seed=0 out=grid.png [prompt="..."] [class_label=3] [steps=2]
                   [negative_prompt="..." nasa_scale=0.1]   # NASA: a negative prompt for 1-step text students
    onestep export run_dir=<run folder> out=<folder> [overwrite=true] [lora_only=true] [allow_unfinished=true]
    onestep runs [out_root=runs]                   # the run folders: experiment, step, headline metric, status
    onestep eval run_dir=<run folder> [protocol=...] [watch=true poll_s=60] [eval.<key>=value ...]
                                                   # a run's checkpoints under one protocol -> <run>/eval/<protocol>.jsonl
    onestep cache out=<folder> [shard_size=1000] experiment=... data=image_text|webdataset|prompts data.path=...
                                                   # VAE latents + text embeddings once (torchrun: every process)

Errors in user input (ConfigError) print one line and exit with status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import onestep.config  # noqa: F401  (registers the schemas)
import onestep.objectives  # noqa: F401  (registers the objectives)
import onestep.teachers  # noqa: F401  (registers the teacher families and their presets)
from onestep.errors import ConfigError
from onestep.help import default_experiment, did_you_mean, leaf_keys, overview, unread_keys, unread_message

CONFIG_PATH = "pkg://onestep.configs"
COMMANDS = ("train", "bench", "sample", "export", "runs", "eval", "cache")
USAGE = f"usage: onestep {{{'|'.join(COMMANDS)}}} [key=value ...]   (see README.md)"


def _fail(msg: str) -> None:
    print(f"onestep: error: {msg}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path=CONFIG_PATH, config_name="config", version_base="1.3")
def _train(cfg: DictConfig) -> None:
    from onestep.train.interrupt import Interrupted
    from onestep.train.trainer import NonFiniteLoss, train

    _quiet_logs()
    run_dir = cfg.run_dir or HydraConfig.get().runtime.output_dir
    _join_submitit_tasks()
    try:
        train(cfg, run_dir)
        _leave_process_group()
    except ConfigError as e:
        _drop_unstarted_hydra_folder(cfg)
        _fail(str(e))
    except NonFiniteLoss as e:
        _fail(str(e))
    except Interrupted as e:
        print(f"\nonestep: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:  # before the first step or after the last (setup, final evaluation)
        print(f"\nonestep: interrupted outside the training steps; the run folder's checkpoints are intact: "
              f"rerun the same command to resume ({run_dir})", file=sys.stderr)
        sys.exit(130)


def _leave_process_group() -> None:
    """Under torchrun / accelerate launch: close this process's torch.distributed group before the interpreter
    exits (its gloo threads torn down in order, not by static destructors at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _quiet_logs() -> None:
    """Hydra sets the root logger to INFO: keep libraries' INFO lines (matplotlib's "building the font cache")
    out of the run's log."""
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)


def _drop_unstarted_hydra_folder(cfg: DictConfig) -> None:
    """Hydra creates the run folder (its .hydra/ and <job>.log) before the trainer runs. When the trainer stopped
    on bad input it took back what it wrote (train/run_dir.py, undo_on_bad_input); a folder holding nothing but
    Hydra's files is then no run, and goes too (with the experiment folder above it, if that is left empty)."""
    import os
    import shutil

    if os.environ.get("RANK", "0") != "0":  # rank 0 writes Hydra's files (_rank_overrides) and takes them back
        return
    hc = HydraConfig.get()
    folder = Path(hc.runtime.output_dir)
    if not folder.is_dir() or not {p.name for p in folder.iterdir()} <= {hc.output_subdir, f"{hc.job.name}.log"}:
        return
    _close_file_logs_under(folder)
    shutil.rmtree(folder)
    if folder.parent != Path(cfg.out_root) and not any(folder.parent.iterdir()):
        folder.parent.rmdir()


def _close_file_logs_under(folder: Path) -> None:
    """Hydra's job logging added a FileHandler for <folder>/<job>.log to the root logger; with the folder gone, the
    handler would recreate nothing and fail on the next log line of the process (a library's logging.info in the
    same interpreter: tests, notebooks). Detach and close it."""
    import logging

    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename).is_relative_to(folder.resolve()):
            root.removeHandler(h)
            h.close()


def _join_submitit_tasks() -> None:
    """A job of several tasks from Hydra's submitit launcher (hydra.launcher.tasks_per_node > 1 or nodes > 1): each
    task is one process of one run; SLURM's task ids become torch.distributed's env:// variables (RANK,
    WORLD_SIZE, MASTER_ADDR...), which accelerate reads. Under torchrun / accelerate launch they are set already."""
    import os

    try:
        import submitit

        env = submitit.JobEnvironment()
    except (ImportError, RuntimeError):  # not inside a submitit job
        return
    if env.num_tasks > 1 and "RANK" not in os.environ:
        # every task sees all of the node's GPUs; accelerate picks cuda:LOCAL_RANK
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _as_multirun_writes_them(args: list[str]) -> list[str]:
    """Overrides rewritten as Hydra's sweepers pass them to each job of a ``-m`` run (``false`` -> ``False``,
    ``5e-4`` -> ``0.0005``), so that ``onestep train k=v`` and ``onestep train -m k=v,w`` name the run folder alike
    (the folder is the run's identity: either command resumes the other's run). Interpolations stay as typed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.startswith("-") for a in args):  # -m: Hydra's sweeper does it; --cfg, --help: nothing to name
        return args
    parser = OverridesParser.create()
    out = []
    for a in args:
        o = parser.parse_overrides([a])[0]
        if o.is_delete() or a.startswith("hydra") or "${" in a:
            out.append(a)
            continue
        canonical = f"{o.get_key_element()}={o.get_value_element_as_str()}"
        same = parser.parse_overrides([canonical])[0].value() == o.value()
        out.append(canonical if same else a)
    return out


def _rank_overrides() -> list[str]:
    """Under torchrun / accelerate launch every process runs Hydra; only rank 0 writes .hydra/ and the log file
    (the run folder is the same: these are Hydra's own keys, not part of its name)."""
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]


@hydra.main(config_path=CONFIG_PATH, config_name="config", version_base="1.3")
def _bench(cfg: DictConfig) -> None:
    from onestep.eval.bench import bench, runs_protocol

    _quiet_logs()
    try:
        cfg = runs_protocol(cfg, HydraConfig.get().overrides.task)  # with bench.runs: the runs' own protocol
        out = bench(cfg, cfg.bench.out or HydraConfig.get().runtime.output_dir)
    except ConfigError as e:
        _fail(str(e))
    print(f"\n{Path(out['md']).read_text()}\n{out['computed']} points computed, {out['cached']} from cache; "
          f"{out['csv']}, {out['png']}")


def _options(schema, args: list[str], command: str):
    """key=value arguments of the non-Hydra commands, checked against their schema (one-line errors)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    keys = sorted(schema.__dataclass_fields__)
    for a in args:
        if "=" not in a or a.startswith("-"):
            _fail(f"onestep {command} takes key=value arguments, got {a!r}; keys: {', '.join(keys)}")
        if a.split("=", 1)[0] not in keys:
            _fail(f"unknown key {a.split('=', 1)[0]!r} for onestep {command}; keys: {', '.join(keys)}")
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(args))
    except OmegaConfBaseException as e:
        _fail(f"onestep {command}: {_first_line(e)}")


def _device(cpu: bool):
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")


def _sample(args: list[str]) -> None:
    from onestep.config import SampleConfig
    from onestep.runs import load_run
    from onestep.export import sample as S

    o = _options(SampleConfig, args, "sample")
    try:
        out = S.check_request(o.num, o.out, o.steps)
        S.check_nasa_request(o.negative_prompt, o.nasa_scale)
        if not o.run_dir:
            raise ConfigError("run_dir is not set; pass run_dir=<run folder of onestep train, or an export folder>")
        if S.is_export(o.run_dir):
            images = S.sample_export(o.run_dir, o.num, o.seed, o.prompt, o.class_label, o.steps,
                                     str(_device(o.cpu)), o.negative_prompt, o.nasa_scale)
        else:
            run = load_run(o.run_dir, _device(o.cpu), "run_dir", "pass run_dir=<run folder of onestep train>",
                           progress=True, frozen_dtype="fp32")
            images = S.sample_run(run, o.num, o.seed, o.prompt, o.class_label, o.steps, o.negative_prompt,
                                  o.nasa_scale)
        S.write_images(images, out)
    except ConfigError as e:
        _fail(str(e))
    print(f"{len(images)} {'videos' if images.ndim == 5 else 'images'} {tuple(images.shape[1:])} -> {out}")


def _export(args: list[str]) -> None:
    from onestep.config import ExportConfig
    from onestep.runs import load_run
    from onestep.export.pipelines import export, usage_code
    from onestep.networks import EMA

    o = _options(ExportConfig, args, "export")
    try:
        if not o.run_dir:
            raise ConfigError("run_dir is not set; pass run_dir=<run folder of onestep train>")
        from onestep.export.pipelines import prepare_out

        prepare_out(o.out, o.overwrite)  # before the slow load
        run = load_run(o.run_dir, _device(True), "run_dir", "pass run_dir=<run folder of onestep train>",
                       role=EMA if o.ema else "generator", progress=True, frozen_dtype="fp32")
        out = export(run, o.out, overwrite=o.overwrite, lora_only=o.lora_only, allow_unfinished=o.allow_unfinished,
                     single_file=o.single_file)
    except ConfigError as e:
        _fail(str(e))
    import json

    info = json.loads((out / "onestep_export.json").read_text())
    print(f"exported step {info['step']} of {run.path} -> {out}\n\n{usage_code(info, str(out))}")


def _runs(args: list[str]) -> None:
    from onestep.config import RunsConfig
    from onestep.train.run_list import list_runs, table

    o = _options(RunsConfig, args, "runs")
    try:
        runs = list_runs(o.out_root)
    except ConfigError as e:
        _fail(str(e))
    print(table(runs) if runs else f"no run folders under {o.out_root or onestep.config.Config.out_root}")


def _eval(args: list[str]) -> None:
    from onestep.config import EvalRunConfig
    from onestep.eval.watch import evaluate_run

    section = [a for a in args if a.startswith("eval.")]  # the run's eval section, changed
    o = _options(EvalRunConfig, [a for a in args if not a.startswith("eval.")], "eval")
    try:
        if not o.run_dir:
            raise ConfigError("run_dir is not set; pass run_dir=<run folder of onestep train>")
        out = evaluate_run(o.run_dir, o.protocol, section, watch=o.watch, poll_s=o.poll_s, device=_device(o.cpu),
                           progress=o.progress)
    except ConfigError as e:
        _fail(str(e))
    print(f"rows: {out}")


def _cache(args: list[str]) -> None:
    from onestep.config import CacheConfig
    from onestep.train.cache import cache

    own = set(CacheConfig.__dataclass_fields__)
    o = _options(CacheConfig, [a for a in args if a.split("=", 1)[0] in own], "cache")
    overrides = [a for a in args if a.split("=", 1)[0] not in own]
    try:
        cfg = _compose(overrides)
    except Exception as e:  # noqa: BLE001 - Hydra's override grammar and unknown keys
        _fail(_explain(e, overrides))
    try:
        info = cache(cfg, o.out, o.shard_size, o.progress)
    except ConfigError as e:
        _fail(str(e))
    print(json.dumps(info, indent=2))
    _leave_process_group()


def _bench_overrides(args: list[str]) -> list[str]:
    """Hydra's run folder is the bench folder (bench.out, else <out_root>/bench/<experiment>: the experiment of the
    runs in bench.runs, else the composed one), with no .hydra/."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from onestep.eval.bench import folder_name

    given = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(args) if not o.is_delete()}
    experiment = "${hydra:runtime.choices.experiment}"
    if given.get("bench.runs"):
        try:
            experiment = folder_name([str(r) for r in given["bench.runs"]], given.get("experiment"))
        except ConfigError as e:
            _fail(str(e))
    out = next((a.split("=", 1)[1] for a in args if a.startswith("bench.out=")), None)
    run_dir = out or f"${{out_root}}/bench/{experiment}"
    return [f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _explain(e: Exception, args: list[str] = ()) -> str:
    """Hydra's composition errors, as one line naming the key/option and the fix."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(e, MissingConfigException):
        missing = _first_line(e).split("Could not find ")[-1].strip("'")
        group, _, name = missing.rpartition("/")
        return (f"'{name}' is not an option of config group '{group}'; choose {group}=<one of "
                f"{', '.join(e.options or [])}>")
    if isinstance(e, OverrideParseException):
        return f"{_first_line(e)}; overrides look like key=value (see `onestep train --help`)"
    msg, cause = _first_line(e), e.__cause__
    lines = str(e).splitlines()
    if msg.startswith("In 'experiment/") and len(lines) > 1 and "not in '" in lines[1]:
        # an experiment yaml sets objective.<key> that the objective chosen on the command line lacks
        experiment = msg.split("'")[1].split("/")[1]
        key = lines[1].split("'")[1]
        return (f"experiment={experiment} sets '{key}', which the chosen option does not have ({lines[1].strip()}); "
                f"pick an experiment made for it (ls configs/experiment: e.g. experiment=gmm_<objective>)")
    if msg.startswith("Could not override"):
        key = msg.split("'")[1]
        return (f"unknown config key '{key}'{did_you_mean(key, _known_keys(args))}; "
                f"`onestep train [experiment=...] --help` lists the keys that apply")
    if cause is not None:
        return f"{msg}: {_first_line(cause)}"
    return msg


def _precheck(args: list[str], command: str) -> None:
    """Compose the config once with Hydra's compose API so that a bad override or (for train) an out-of-range
    value fails with one line before Hydra prints its multi-line report (and before it creates any folder)."""
    if any(a.startswith("-") for a in args):  # --cfg, -m, --hydra-help...: Hydra's own handling
        return
    try:
        cfg = _compose(args)
    except Exception as e:  # noqa: BLE001 - every composition error becomes one line
        _fail(_explain(e, args))
    unread = unread_keys(cfg)  # added with +key=... or by an experiment yaml: nothing would read them
    if unread:
        _fail(unread_message(unread, cfg))
    if command == "train":
        from onestep.validate import check_config

        try:
            check_config(cfg)
        except ConfigError as e:
            _fail(str(e))
    _check_writable("out_root", cfg.out_root)
    if cfg.run_dir:
        _check_writable("run_dir", cfg.run_dir)


def _compose(args: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module("onestep.configs", version_base="1.3"):
        return compose("config", overrides=args)


def _known_keys(args: list[str]) -> list[str]:
    """The keys of the config the group choices among ``args`` (experiment=..., objective=...) compose to."""
    groups = ("experiment", "teacher", "generator", "objective", "data", "trainer", "eval")
    try:
        return leaf_keys(_compose([a for a in args if a.split("=", 1)[0] in groups]))
    except Exception:  # noqa: BLE001 - the choice itself is bad: no suggestion rather than a second error
        return []


def _help(command: str, args: list[str]) -> None:
    """`onestep <command> [...] --help`: the keys that apply, with their doc comments."""
    from onestep.help import schema_help, train_help
    from onestep.objectives import OBJECTIVES

    if command in ("sample", "export", "runs", "eval", "cache"):
        print(schema_help(command))
        return
    args = [a for a in args if not a.startswith("-")]
    try:
        cfg = _compose(args)
    except Exception as e:  # noqa: BLE001
        _fail(_explain(e, args))
    if command == "bench":
        print(schema_help("bench"))
        return
    experiment = next((a.split("=", 1)[1] for a in args if a.startswith("experiment=")), default_experiment())
    cls = OBJECTIVES.get(cfg.objective.name)
    print(train_help(cfg, experiment, trains_critic=cls is not None and "critic" in cls.networks))


def _check_writable(key: str, folder: str) -> None:
    """Create the folder (Hydra would anyway) and probe it with a file, or Hydra fails deep inside mkdir."""
    import tempfile

    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        _fail(f"{key}={folder!r} cannot be created or written ({e.strerror or e}); pass {key}=<writable folder>")


def _with_plugins(args: list[str]) -> list[str]:
    """Import the modules ``plugins=[...]`` names (they register families, objectives and config folders) and add
    their config folders to Hydra's search path."""
    from onestep import plugins

    try:
        plugins.load(plugins.names_in_overrides(args))
    except ConfigError as e:
        _fail(str(e))
    except Exception as e:  # noqa: BLE001 - Hydra's override grammar
        _fail(f"{plugins.KEY}: {_first_line(e)}; pass plugins=[module,...]")
    return plugins.searchpath_overrides() + args


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(overview())
        sys.exit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        _fail(f"unknown command {argv[0]!r}{did_you_mean(argv[0], list(COMMANDS))}; {USAGE}")
    command, rest = argv[0], argv[1:]
    if command in ("train", "bench"):
        rest = _with_plugins(rest)
    if "--help" in rest or "-h" in rest:
        _help(command, rest)
        return
    if command in ("sample", "export", "runs", "eval", "cache"):
        {"sample": _sample, "export": _export, "runs": _runs, "eval": _eval, "cache": _cache}[command](rest)
        return
    _precheck(rest, command)
    if command == "bench" and not any(a.startswith("-") for a in rest):
        rest = rest + _bench_overrides(rest)
    if command == "train":
        rest = _as_multirun_writes_them(rest) + _rank_overrides()
    sys.argv = [f"onestep {command}", *rest]
    {"train": _train, "bench": _bench}[command]()


if __name__ == "__main__":
    main()
