"""The bad-input table (README "Troubleshooting"): one row, one test.

Every row runs the CLI in-process and checks: exit status 2, ONE line on stderr that names
the problem, no traceback, and no partial output file.
"""
import os
import textwrap

import pytest

from pbp_fx.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "models", "digits_mlp.py")

GOOD = """
import torch
from torch import nn
from torch.utils.data import TensorDataset
def build_model(): return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
def example_inputs(): return (torch.randn(2, 4),)
def datasets():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g)
    return (TensorDataset(x, (x[:, 0] > 0).long()),) * 3
"""


def _file(tmp, text):
    p = tmp / "model.py"
    p.write_text(textwrap.dedent(text))
    return str(p)


def _checkpoint_of_other_model(tmp):
    import torch
    from torch import nn

    import pbp_fx

    pm = pbp_fx.perforate(nn.Sequential(nn.Linear(64, 5), nn.ReLU(), nn.Linear(5, 10)), (torch.randn(2, 64),))
    path = str(tmp / "other.safetensors")
    pbp_fx.save(pm, path, extra={"model": DIGITS})
    return path


def _readonly_dir(tmp):
    d = tmp / "ro"
    d.mkdir()
    d.chmod(0o500)
    return str(d / "m.onnx")


# row -> (argv builder, words the message must contain)
ROWS = {
    "missing model file": (lambda t: ["transform", str(t / "absent.py")], "does not exist"),
    "unreadable model file": (lambda t: ["transform", str(t)], "not a regular file"),
    "model file raises on import": (lambda t: ["transform", _file(t, "raise RuntimeError('boom')\n")],
                                    "raised RuntimeError: boom"),
    "missing build_model": (lambda t: ["transform", _file(t, "def example_inputs(): return ()\n")],
                            "build_model()"),
    "missing example_inputs": (lambda t: ["transform", _file(t, "def build_model(): return None\n")],
                               "example_inputs()"),
    "example inputs of the wrong shape": (lambda t: ["transform", _file(t, GOOD.replace("randn(2, 4)", "randn(2, 9)"))],
                                          "example inputs do not run"),
    "example inputs of the wrong dtype": (lambda t: ["transform", _file(t, GOOD.replace(
        "torch.randn(2, 4),)", "torch.ones(2, 4, dtype=torch.long),)"))], "example inputs do not run"),
    "no Linear/Conv sites": (lambda t: ["transform", _file(t, GOOD.replace(
        "nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))", "nn.Sequential(nn.ReLU())"))], "no Linear/Conv"),
    "all sites excluded": (lambda t: ["transform", _file(t, GOOD), "--exclude", "*"], "no Linear/Conv"),
    "untraceable root": (lambda t: ["transform", _file(t, GOOD.replace(
        "def build_model(): return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))",
        "class M(nn.Module):\n"
        "    def __init__(self):\n        super().__init__(); self.w = nn.Parameter(torch.randn(2, 4))\n"
        "    def forward(self, x):\n"
        "        y = nn.functional.linear(x, self.w)\n        return y if x.sum() > 0 else -y\n"
        "def build_model(): return M()"))], "cannot trace M.forward"),
    "NaN in the data": (lambda t: ["train", _file(t, GOOD.replace("x = torch.randn(40, 4, generator=g)",
                                                               "x = torch.full((40, 4), float('nan'))")),
                                   "--out", str(t / "out")], "training data holds NaN/Inf"),
    "NaN in the loss": (lambda t: ["train", _file(t, GOOD + "\ndef loss_fn(out, y):\n    return out.sum() * float('nan')\n"),
                                   "--out", str(t / "out")], "loss is nan"),
    "empty dataset": (lambda t: ["train", _file(t, GOOD.replace("torch.randn(40, 4, generator=g)",
                                                                "torch.randn(0, 4)")), "--out", str(t / "out")],
                      "dataset is empty"),
    "max_dendrites=0": (lambda t: ["train", _file(t, GOOD), "--max-dendrites", "0", "--out", str(t / "out")],
                        "at least 1"),
    "ONNX path in a missing directory": (lambda t: ["export", DIGITS, "-o", str(t / "absent" / "m.onnx")],
                                         "does not exist"),
    "ONNX path in a read-only directory": (lambda t: ["export", DIGITS, "-o", _readonly_dir(t)],
                                           "nothing can be written in"),
    "checkpoint from another model": (lambda t: ["export", _checkpoint_of_other_model(t), "-o", str(t / "m.onnx")],
                                      "belongs to another model"),
}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_bad_input(tmp_path, capsys, row):
    if row == "ONNX path in a read-only directory" and os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    build, words = ROWS[row]
    argv = build(tmp_path) + ["--no-progress"] * (build(tmp_path)[0] == "train")
    before = set(os.listdir(tmp_path))
    assert main(argv) == 2, row
    err = capsys.readouterr().err.strip()
    assert err.startswith("pbp-fx: error:"), err
    assert "\n" not in err and "Traceback" not in err
    assert words in err, err
    new = set(os.listdir(tmp_path)) - before
    assert not any(n.endswith((".onnx", ".safetensors", ".json", ".png")) for n in new)
    assert not os.path.exists(tmp_path / "out" / "checkpoint.safetensors")
    assert not os.path.exists(tmp_path / "m.onnx")


def test_the_launcher_leaves_out_a_rank_that_was_only_stopped_for_another(tmp_path):
    """Rank 1's data failed; torchrun then stopped rank 0, whose bare 'terminated' line came first."""
    from pbp_fx.errors import rank_errors

    (tmp_path / "rank0").write_text("pbp-fx: error: terminated\n")
    (tmp_path / "rank1").write_text("pbp-fx: error: rank 1: the first training samples fail (ValueError)\n")
    assert rank_errors(str(tmp_path), 2) == ["pbp-fx: error: rank 1: the first training samples fail (ValueError)"]
    (tmp_path / "rank1").write_text("pbp-fx: error: terminated\n")  # (both stopped: one line says so)
    assert rank_errors(str(tmp_path), 2) == ["pbp-fx: error: terminated"]


def test_a_rank_stopped_alone_is_named_where_the_others_only_lost_contact(tmp_path):
    """A SIGTERM to rank 1's process: its bare 'terminated' was left out as a consequence, and the one line said
    rank 0 lost contact, naming neither rank 1 nor the stop (the distributed review)."""
    from pbp_fx.errors import rank_errors

    (tmp_path / "rank0").write_text("pbp-fx: error: rank 0 lost contact with the other ranks (Connection closed by "
                                    "peer): another rank exited or did not answer within the 300 s timeout\n")
    (tmp_path / "rank1").write_text("pbp-fx: error: terminated after epoch 4; the run so far resumes with pbp-fx train "
                                    "--resume out --nproc 2\n")
    assert rank_errors(str(tmp_path), 2) == ["pbp-fx: error: rank 1 alone was terminated after epoch 4; the run so far "
                                             "resumes with pbp-fx train --resume out --nproc 2"]
    (tmp_path / "rank1").write_text("pbp-fx: error: terminated\n")
    assert rank_errors(str(tmp_path), 2) == ["pbp-fx: error: rank 1 alone was terminated"]


def test_ranks_stopped_an_epoch_apart_say_one_line_with_the_checkpoints_epochs(tmp_path):
    """A SIGTERM to the launcher reached rank 1 just after rank 0 finished saving epoch 35: two lines, 34 and 35
    (a make test run on a clean clone)."""
    from pbp_fx.errors import rank_errors

    line = "pbp-fx: error: terminated after epoch {}; the run so far resumes with pbp-fx train --resume out --nproc 2\n"
    (tmp_path / "rank0").write_text(line.format(35))
    (tmp_path / "rank1").write_text(line.format(34))
    assert rank_errors(str(tmp_path), 2) == [line.format(35).rstrip("\n")]
    (tmp_path / "rank1").write_text(line.format(35).replace("terminated", "interrupted"))  # (not the same stop)
    assert len(rank_errors(str(tmp_path), 2)) == 2
