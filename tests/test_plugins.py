"""The ``plugins`` key: modules named on the command line are imported before Hydra composes, and their config
folders join the search path; a bad name is one line."""

import subprocess
import sys
import textwrap

from onestep import plugins
from onestep.errors import ConfigError

import pytest


def test_names_in_overrides():
    assert plugins.names_in_overrides(["experiment=gmm_dmd2", "plugins=[a.b,c]"]) == ["a.b", "c"]
    assert plugins.names_in_overrides(["plugins=a"]) == ["a"]
    assert plugins.names_in_overrides(["trainer.steps=3"]) == []


def test_unknown_module_is_one_line():
    with pytest.raises(ConfigError, match="plugins: cannot import 'no_such_plugin_module'.*PYTHONPATH"):
        plugins.load(["no_such_plugin_module"])


def test_cli_imports_plugin_and_finds_its_experiment(tmp_path):
    """A plugin module that ships an experiment yaml: `onestep train plugins=[...] experiment=<its yaml> --cfg job`
    composes it (the yaml is found only through the plugin's config folder)."""
    (tmp_path / "configs" / "experiment").mkdir(parents=True)
    (tmp_path / "configs" / "experiment" / "plugin_ring.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        # A ring experiment that lives outside onestep.
        defaults:
          - override /teacher: gmm_ring
        trainer:
          steps: 7
        """))
    (tmp_path / "my_plugin.py").write_text(textwrap.dedent("""\
        from pathlib import Path
        from onestep import plugins
        plugins.add_config_dir(Path(__file__).parent / "configs")
        """))
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "onestep.cli", "train", "plugins=[my_plugin]", "experiment=plugin_ring", "--cfg", "job"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "steps: 7" in out.stdout and "- my_plugin" in out.stdout
    bad = subprocess.run(cmd[:3] + ["plugins=[not_a_module_here]"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not_a_module_here" in bad.stderr
