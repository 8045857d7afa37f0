"""The bad-input table (README, "Bad input"): every case ends `onestep train` with exit status 2 and exactly one
stderr line "onestep: error: ..." naming the key, and loses nothing: a rejected config creates no folder at
all, a run that stops on a bad file leaves no run folder behind, and an existing run's checkpoint and config
stay byte-identical. The cases go through the CLI's entry in-process (``cli.main``: precheck, Hydra, trainer, as
the `onestep` command runs them, without a new interpreter per case). Cases of the table tested elsewhere:
tests/test_train.py (test_cli_bad_input_is_one_line) and tests/test_sd_train.py (test_bad_input_is_one_line)."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import compose
from onestep import checkpoint, cli
from onestep.errors import ConfigError
from onestep.train.run_dir import prepare_run_dir
from onestep.train.trainer import train

#: a run of a few seconds that reaches every stage a bad input can stop (teacher net, pairs, first steps)
BASE = ["experiment=gmm_dmd2", "teacher.net_steps=5", "teacher.net_hidden=16", "trainer.steps=4",
        "trainer.batch_size=16", "trainer.checkpoint_every=2", "trainer.progress=false",
        "objective.regression_pairs=8", "objective.regression_steps=2", "eval.num_samples=16",
        "eval.teacher_steps=[2]", "eval.plot=false"]
DIGITS_TEACHER = Path(__file__).resolve().parents[1] / "onestep" / "assets" / "digits_teacher"

#: (case, overrides, the key the message must name): rejected by check_config before anything is created
CONFIG_CASES = [
    ("unknown teacher kind", ["teacher.kind=nope"], "teacher.kind"),
    ("data the teacher does not train on", ["data=digits"], "use data=gmm, not data=digits"),
    ("text teacher on class data", ["experiment=sd15_dmd2", "data=digits"], "trains on text: use data=prompts"),
    ("resolution for a fixed-size teacher", ["experiment=digits_dmd2", "teacher.resolution=16"], "teacher.resolution"),
    ("zero batch size", ["trainer.batch_size=0"], "trainer.batch_size"),
    ("zero training steps", ["trainer.steps=0"], "trainer.steps"),
    ("negative learning rate", ["trainer.generator_optim.lr=-1e-4"], "trainer.generator_optim.lr"),
    ("NaN learning rate", ["trainer.critic_optim.lr=nan"], "trainer.critic_optim.lr"),
    ("Adam beta of 1", ["trainer.critic_optim.betas=[0.9,1.0]"], "trainer.critic_optim.betas"),
    ("negative weight decay", ["trainer.generator_optim.weight_decay=-0.01"], "trainer.generator_optim.weight_decay"),
    ("EMA decay of 1", ["trainer.ema_decay=1.0"], "trainer.ema_decay"),
    ("zero checkpoint cadence", ["trainer.checkpoint_every=0"], "trainer.checkpoint_every"),
    ("zero log cadence", ["trainer.log_every=0"], "trainer.log_every"),
    ("negative keep_checkpoints", ["trainer.keep_checkpoints=-1"], "trainer.keep_checkpoints"),
    ("unsupported mixed precision", ["trainer.mixed_precision=fp8"], "trainer.mixed_precision"),
    ("t fractions out of order", ["objective.t_lo=0.5", "objective.t_hi=0.1"], "objective.t_lo"),
    ("GAN t fraction above 1", ["objective.gan_t_hi=1.5"], "objective.gan_t_hi"),
    ("TTUR of 0", ["objective.ttur=0"], "objective.ttur"),
    ("zero regression ODE steps", ["objective.regression_steps=0"], "objective.regression_steps"),
    ("zero student steps", ["generator.steps=0"], "generator.steps"),
    ("empty t-list", ["generator.ts=[]"], "generator.ts"),
    ("unknown student sampler", ["generator.method=heun"], "generator.method"),
    ("non-positive LoRA rank (MLP)", ["critic.lora.rank=-2"], "critic.lora.rank"),
    ("non-positive LoRA alpha", ["generator.lora.rank=4", "generator.lora.alpha=0"], "generator.lora.alpha"),
    ("negative CFG scale", ["teacher.guidance=-1"], "teacher.guidance"),
    ("zero DSM learning rate", ["teacher.net_lr=0"], "teacher.net_lr"),
    ("zero eval samples", ["eval.num_samples=0"], "eval.num_samples"),
    ("zero teacher eval steps", ["eval.teacher_steps=[0,4]"], "eval.teacher_steps"),
    ("hybrid sampling of a 1-step student", ["eval.hybrid_teacher_steps=[1]"], "eval.hybrid_teacher_steps"),
]

#: (case, overrides, key): known only once a file is read or the teacher is built; the run folder is taken back
RUN_CASES = [
    ("CFG scale with an unconditional teacher", ["teacher.guidance=3"], "teacher.guidance"),
    ("missing teacher folder", ["experiment=digits_dmd2", "teacher.path={missing}"], "teacher.path"),
    ("garbled teacher folder", ["experiment=digits_dmd2", "teacher.path={garbled}"], "teacher.path"),
    ("corrupt teacher safetensors", ["experiment=digits_dmd2", "teacher.path={truncated}"], "teacher.path"),
    ("corrupt pairs safetensors", ["objective.pairs_file={bad_pairs}"], "objective.pairs_file"),
    ("pairs with another channel count than the teacher", ["objective.pairs_file={pairs_3d}"], "objective.pairs_file"),
    ("prompts file missing", ["experiment=sd15_dmd2", "data.path={missing}/prompts.txt"], "data.path"),
    ("unwritable run folder", ["run_dir={file}/run"], "run_dir"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    (root / "file").write_text("a file, not a folder\n")
    garbled, truncated = root / "garbled", root / "truncated"
    for folder in (garbled, truncated):
        shutil.copytree(DIGITS_TEACHER, folder)
    (garbled / "onestep.json").write_text('{"denoiser": {"schedule": ')
    weights = truncated / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (root / "bad_pairs.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    save_file({"noise": torch.zeros(8, 3), "sample": torch.zeros(8, 3)}, str(root / "pairs_3d.safetensors"))
    return {"file": root / "file", "missing": root / "missing", "garbled": garbled, "truncated": truncated,
            "bad_pairs": root / "bad_pairs.safetensors", "pairs_3d": root / "pairs_3d.safetensors"}


@pytest.fixture(autouse=True)
def _cli_state(monkeypatch):
    """cli.main hands sys.argv to Hydra and Hydra configures the root logger: both are put back afterwards."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _onestep_train(args: list[str], capsys) -> str:
    """`onestep train <args>` in this process; asserts exit status 2 and one stderr line, and returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        cli.main(["train", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("onestep: error:"), err
    return err[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case, args, key", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_one_line_and_creates_nothing(tmp_path, capsys, case, args, key):
    out = tmp_path / "runs"
    line = _onestep_train([*BASE, *args, f"out_root={out}"], capsys)
    assert key in line
    assert not out.exists()  # rejected before out_root, Hydra's folder or the run folder


@pytest.mark.parametrize("case, args, key", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_bad_input_found_while_running_leaves_no_run_folder(tmp_path, capsys, files, case, args, key):
    out = tmp_path / "runs"
    line = _onestep_train([*BASE, *(a.format(**files) for a in args), f"out_root={out}"], capsys)
    assert key in line
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))


@pytest.fixture
def finished_run(tmp_path):
    """A run folder as `onestep train *BASE run_dir=<run> out_root=<tmp>/runs` leaves it (config.yaml, a
    checkpoint, the GMM teacher net), made directly."""
    run = tmp_path / "run"
    prepare_run_dir(compose([*BASE, f"run_dir={run}", f"out_root={tmp_path / 'runs'}"]))
    net = torch.nn.Linear(2, 2)
    checkpoint.save(run, 2, {"generator": net}, {"step": 2})
    save_file(net.state_dict(), str(run / "teacher_net.safetensors"))
    return run


@pytest.mark.parametrize("case, args, key, damage", [
    ("changed config on resume", ["objective.ttur=2"], "objective.ttur", None),
    ("corrupt teacher net of a run", [], "teacher_net.safetensors", "teacher_net.safetensors"),
], ids=["changed config on resume", "corrupt teacher net of a run"])
def test_bad_input_on_resume_keeps_the_run_byte_identical(tmp_path, capsys, finished_run, case, args, key, damage):
    if damage:
        (finished_run / damage).write_bytes(b"garbage")
    before = _files(finished_run)
    out = tmp_path / "runs"
    line = _onestep_train([*BASE, *args, f"run_dir={finished_run}", f"out_root={out}"], capsys)
    assert key in line
    assert _files(finished_run) == before
    assert not any(out.iterdir())  # Hydra's own folder for the command is taken back too


@pytest.mark.parametrize("args", [["trainer.batch_size=0"], ["teacher.guidance=3"]], ids=["config", "while running"])
def test_python_api_rejects_without_leaving_a_folder(tmp_path, args):
    run = tmp_path / "a" / "run"
    with pytest.raises(ConfigError, match="trainer.batch_size|teacher.guidance"):
        train(compose([*BASE, *args]), run)
    assert not run.exists()
