"""The notebooks run top to bottom (in their SMOKE size) as plain Python."""
import json
import os

import pytest

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb")))
def test_notebook_runs(name, tmp_path, monkeypatch):
  monkeypatch.setenv("VLM_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("VLM_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
  monkeypatch.chdir(os.path.join(NOTEBOOKS, ".."))
  nb = json.load(open(os.path.join(NOTEBOOKS, name)))
  namespace = {"__name__": "__notebook__"}
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      exec(compile("".join(cell["source"]), f"{name}:cell", "exec"), namespace)
