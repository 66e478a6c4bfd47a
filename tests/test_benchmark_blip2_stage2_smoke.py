"""``scripts/benchmark_blip2_stage2.py --smoke`` runs end to end (tiny OPT model, one train step
and one beam search per side) and its cross-checks hold: the first-step losses of vlm and HF agree
within 1e-4 and the beam-search tokens are equal in every row. No timing is checked."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_blip2_stage2_smoke(tmp_path):
  out_json = tmp_path / "s2.json"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark_blip2_stage2.py"),
                         "--smoke", "--json", str(out_json)],
                        capture_output=True, text=True, timeout=300, cwd=ROOT,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "first-step losses equal within 1e-4: yes" in proc.stdout, proc.stdout[-3000:]
  assert "rows token-for-token equal to HF up to the first stop token: 2/2" in proc.stdout, \
      proc.stdout[-3000:]
  assert "train step" in proc.stdout and "beam search" in proc.stdout
  assert out_json.exists()
