"""examples/hf_trainer.py and examples/lightning_cnn.py: stock scripts plus a few `# PB` lines; both run."""
import os
import re
import subprocess
import sys

import pytest

from pbp_fx.checkpoint import read_structure

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _example(name: str) -> str:
    return os.path.join(ROOT, "examples", name)


def _pb_lines(path: str) -> list[str]:
    return [line for line in open(path) if line.rstrip().endswith("# PB")]


def _stock(path: str, tmp_path) -> str:
    """The example without its PB lines: the stock script it was made from."""
    stock = tmp_path / ("stock_" + os.path.basename(path))
    stock.write_text("".join(line for line in open(path) if not line.rstrip().endswith("# PB")))
    return str(stock)


def _run(*cmd, timeout=600) -> str:
    r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("name, changed", [("hf_trainer.py", 3), ("lightning_cnn.py", 3)])
def test_examples_change_a_stock_script_by_three_lines(name, changed):
    lines = _pb_lines(_example(name))
    assert len(lines) == changed, lines
    assert any("perforate(" in line for line in lines) and any("PBCallback(" in line for line in lines)


# Each run starts Python, imports transformers or lightning and traces the model: ~20 s each here.
@pytest.mark.slow
def test_hf_example_runs(tmp_path):
    out = _run(_example("hf_trainer.py"), "--epochs", "3", "--out", str(tmp_path))
    assert re.search(r"^epochs 3, eval_loss [0-9.]+, eval_accuracy 0\.", out, re.M), out[-500:]
    structure = read_structure(str(tmp_path / "pbp_fx.safetensors"))  # written by PBCallback
    assert len(structure["sites"]) == 8 and structure["phase"] == "neuron"
    assert os.path.isfile(tmp_path / "model.safetensors")  # trainer.save_model()


@pytest.mark.slow
def test_lightning_example_runs():
    out = _run(_example("lightning_cnn.py"), "--epochs", "3", "--samples", "1000")
    assert re.search(r"^epochs 3, test loss [0-9.]+, test accuracy 0\.", out, re.M), out[-500:]


@pytest.mark.slow
@pytest.mark.parametrize("name, args", [("hf_trainer.py", ["--epochs", "1"]),
                                        ("lightning_cnn.py", ["--epochs", "1", "--samples", "1000"])])
def test_stock_scripts_run_without_the_pb_lines(name, args, tmp_path):
    out = _run(_stock(_example(name), tmp_path), *args, *(["--out", str(tmp_path)] if "hf" in name else []))
    assert re.search(r"^epochs 1, ", out, re.M), out[-500:]
