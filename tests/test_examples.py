"""The README's example scripts run as documented."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_custom_loop_example_runs_and_marks_its_eight_pb_lines():
    path = os.path.join(ROOT, "examples", "custom_loop.py")
    assert sum("  # PB" in line for line in open(path)) == 8  # code lines, not the docstring: the README's 8 added
    r = subprocess.run([sys.executable, path, "--epochs", "3"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "dendrites per site" in r.stdout and "test 0." in r.stdout
