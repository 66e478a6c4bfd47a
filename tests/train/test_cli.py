"""Config mistakes on the command line are one clear message naming the key or file and the fix."""
import os
import subprocess
import sys

import pytest

from vlm.train import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = os.path.join(ROOT, "configs", "blip2", "stage1.py")


@pytest.mark.parametrize("override,expected", [
    ("optim.learning_rate=1e-3", "did you mean 'optim.lr'?"),
    ("batch_size=4", "did you mean 'global_batch_size'?"),
    ("optim.lrr=1", "did you mean 'optim.lr'?"),
    ("mesh.shape.model=2", "Fields of mesh.shape: data, expert, fsdp, tensor"),
    ("total_steps.x=2", "total_steps is a value (int)"),
])
def test_unknown_override_key_names_the_closest_field(override, expected):
  with pytest.raises(cli.ConfigError, match="unknown config key") as e:
    cli.check_config_argv(["train.py", f"--config={CFG}:tiny", f"--config.{override}"])
  assert expected in str(e.value), str(e.value)


def test_valid_overrides_and_no_config_pass():
  cli.check_config_argv(["train.py", "--config", f"{CFG}:tiny", "--config.optim.lr=1e-3",
                         "--config.mesh.shape.expert=1", "--config.eval.at_end=False"])
  cli.check_config_argv(["train.py", "--workdir=x"])


def test_missing_config_file_and_bad_variant():
  missing = os.path.join(ROOT, "configs", "blip2", "stage_1.py")
  with pytest.raises(cli.ConfigError, match="config file not found") as e:
    cli.check_config_argv(["train.py", f"--config={missing}:tiny"])
  assert "did you mean" in str(e.value) and "stage1.py" in str(e.value)
  with pytest.raises(cli.ConfigError, match="unknown variant 'huge'"):
    cli.check_config_argv(["train.py", f"--config={CFG}:huge"])


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_scripts_exit_with_one_line(script, tmp_path):
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", script), f"--config={CFG}:tiny",
       f"--workdir={tmp_path}", "--config.optim.learning_rate=1"],
      capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert out.returncode != 0
  lines = out.stderr.strip().splitlines()
  assert lines[-1].startswith("error: unknown config key 'optim.learning_rate'"), out.stderr
  assert "Traceback" not in out.stderr


def test_train_script_reports_bad_data_in_one_line(tmp_path):
  """An error that names the file (here: a missing conversation file) ends the run with one
  ``error:`` line and exit code 1, no library traceback; VLM_TRACEBACK=1 shows it."""
  cfg = tmp_path / "my_sft.py"
  missing = tmp_path / "missing.json"
  cfg.write_text("from vlm.tasks.qwen_vl import qwen_vl_config\n\n\n"
                 "def get_config(arg=None):\n"
                 "  c = qwen_vl_config('sft', arg)\n"
                 f"  c.data.sources = [{{'type': 'conversations', 'path': {str(missing)!r}}}]\n"
                 "  return c\n")
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), f"--config={cfg}:tiny",
         f"--workdir={tmp_path / 'run'}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one device, as a user runs it
  env.pop("VLM_TRACEBACK", None)
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
  assert out.returncode == 1, out.stderr[-2000:]
  assert "Traceback" not in out.stderr, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert lines[-2].startswith("error: FileNotFoundError: conversation file not found"), lines[-3:]
  assert str(missing) in lines[-2]
