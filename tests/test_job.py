"""`pbp-fx train`: the main job end to end on digits, and its bad-input rows."""
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import pbp_fx
from pbp_fx.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "models", "digits_mlp.py")
FAST = ["--max-dendrites", "1", "--max-dendrite-epochs", "10", "--patience", "10", "--no-progress", "--seed", "0"]


def test_the_epoch_cap_row_says_it_holds_the_best_models_score(tmp_path, capsys):
    """The epoch-cap row showed the best model's score and dendrites (restored) beside the epoch, where every
    other row shows its epoch's own, and history.json's row of that epoch read otherwise (a reviewer)."""
    out = tmp_path / "run"
    assert main(["train", DIGITS, "--out", str(out), "--epochs", "4", "--no-progress"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "epoch cap (4) reached" in line)
    summary = json.loads((out / "summary.json").read_text())
    assert row.endswith("epoch cap (4) reached: back to the best model (its val and dendrites)")
    assert f"{summary['val']:.4f}" in row and summary["events"][-1]["restored_best"] is True


def test_train_digits_adds_a_dendrite_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", DIGITS, "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "phase history" in printed and "installed dendrite 1" in printed
    assert sorted(os.listdir(out)) == ["checkpoint.safetensors", "history.json", "plot.png", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert max(summary["dendrites"].values()) >= 1
    assert summary["params"] > summary["params_plain"]
    history = json.loads((out / "history.json").read_text())
    assert {r["phase"] for r in history["epochs"]} == {"neuron", "dendrite"}
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The checkpoint rebuilds the trained model on a fresh one: same test accuracy.
    sys.path.insert(0, os.path.dirname(DIGITS))
    from pbp_fx.job import load_job_module, make_loaders

    mod = load_job_module(DIGITS)
    pm = pbp_fx.load(str(out / "checkpoint.safetensors"), mod.build_model, mod.example_inputs())
    test_loader = make_loaders(mod.datasets(seed=0), 100, 0)[2]
    assert pbp_fx.evaluate(pm, test_loader) == pytest.approx(summary["test"])
    assert pm.num_dendrites == summary["dendrites"]


def _write(path, text):
    path.write_text(text)
    return str(path)


NO_DATA = "import torch\ndef build_model(): return torch.nn.Linear(3, 2)\ndef example_inputs(): return (torch.randn(2, 3),)\n"
EMPTY = NO_DATA + ("from torch.utils.data import TensorDataset\n"
                   "def datasets():\n    e = TensorDataset(torch.empty(0, 3), torch.empty(0, dtype=torch.long))\n"
                   "    return e, e, e\n")


NAN_VAL = NO_DATA + ("from torch.utils.data import TensorDataset\n"
                     "def datasets():\n    x, y = torch.randn(8, 3), torch.zeros(8, dtype=torch.long)\n"
                     "    bad = x.clone()\n    bad[3, 1] = float('nan')\n"
                     "    return TensorDataset(x, y), TensorDataset(bad, y), TensorDataset(x, y)\n")


LABELS_OUT_OF_RANGE = NO_DATA + ("from torch.utils.data import TensorDataset\n"
                                 "def datasets():\n    d = TensorDataset(torch.randn(8, 3), torch.arange(8) % 5)\n"
                                 "    return d, d, d\n")
BAD_TASK = LABELS_OUT_OF_RANGE.replace("% 5", "% 2") + "TASK = 'ranking'\n"
GOOD = LABELS_OUT_OF_RANGE.replace("% 5", "% 2")
BAD_TEST_DATA = NO_DATA + ("from torch.utils.data import TensorDataset\n"
                           "def datasets():\n    d, y = torch.randn(8, 3), torch.arange(8) % 2\n"
                           "    return TensorDataset(d, y), TensorDataset(d, y), TensorDataset(torch.randn(8, 5), y)\n")
FLAT_REGRESSION_TARGETS = ("import torch\nfrom torch.utils.data import TensorDataset\nTASK = 'regression'\n"
                           "def build_model(): return torch.nn.Linear(3, 1)\n"
                           "def example_inputs(): return (torch.randn(2, 3),)\n"
                           "def datasets():\n    d = TensorDataset(torch.randn(8, 3), torch.randn(8))\n    return d, d, d\n")
LATE_LABEL = NO_DATA + ("from torch.utils.data import TensorDataset\n"
                        "def datasets():\n    y = torch.arange(40) % 2\n    bad = y.clone()\n    bad[30] = 2\n"
                        "    x = torch.randn(40, 3)\n    return TensorDataset(x, y), TensorDataset(x, bad), TensorDataset(x, y)\n")
WITH_BATCHNORM = GOOD.replace("torch.nn.Linear(3, 2)", "torch.nn.Sequential(torch.nn.Linear(3, 4), "
                              "torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))")
CONV_BATCHNORM = ("import torch\nfrom torch import nn\nfrom torch.utils.data import TensorDataset\n"
                  "def build_model(): return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), "
                  "nn.Linear(4 * 4 * 4, 2))\n"
                  "def example_inputs(): return (torch.randn(2, 1, 6, 6),)\n"
                  "def datasets():\n    d = TensorDataset(torch.randn(12, 1, 6, 6), torch.arange(12) % 2)\n"
                  "    return d, d, d\n")
TOKENS = ("import torch\nfrom torch import nn\nfrom torch.utils.data import TensorDataset\n"
          "import torch.nn.functional as F\n"
          "def build_model(): return nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))\n"
          "def example_inputs(): return (torch.randint(0, 10, (2, 4)),)\n"
          "def loss_fn(o, y): return F.cross_entropy(o.flatten(0, 1), y.flatten())\n"
          "def metric(o, y): return float((o.argmax(-1) == y).sum()), y.numel()\n"
          "def datasets():\n    x = torch.randint(0, 10, (16, 4))\n    d = TensorDataset(x, (x + 1) % 10)\n"
          "    return d, d, d\n")
TAGGER = ("import torch\nfrom torch import nn\nfrom torch.utils.data import TensorDataset\n"
          "def build_model(): return nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 5))\n"
          "def example_inputs(): return (torch.randint(0, 10, (2, 7)),)\n"
          "def datasets():\n    x = torch.randint(0, 10, (16, 7))\n    d = TensorDataset(x, x % 5)\n"
          "    return d, d, d\n")
ONE_LOGIT = ("import torch\nfrom torch import nn\nfrom torch.utils.data import TensorDataset\n"
             "def build_model(): return nn.Linear(3, 1)\n"
             "def example_inputs(): return (torch.randn(2, 3),)\n"
             "def loss_fn(o, y): return nn.functional.binary_cross_entropy_with_logits(o, y)\n"
             "def datasets():\n    x = torch.randn(16, 3)\n    d = TensorDataset(x, (x[:, :1] > 0).float())\n"
             "    return d, d, d\n")
TENSOR_METRIC = GOOD + "def metric(o, y): return (o.argmax(1) == y).sum(), torch.tensor(y.numel())\n"
TWO_HEADS = GOOD.replace("def build_model(): return torch.nn.Linear(3, 2)", (
    "class Heads(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
    "        self.aux, self.cls = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)\n"
    "    def forward(self, x): return {'aux': self.aux(x), 'cls': self.cls(x)}\n"
    "def build_model(): return Heads()\n"
    "def loss_fn(o, y): return torch.nn.functional.cross_entropy(o['cls'], y)\n"))
ITERABLE = NO_DATA + ("from torch.utils.data import IterableDataset\n"
                      "class It(IterableDataset):\n    def __iter__(self):\n"
                      "        return iter([(torch.randn(3), 0)] * 8)\n"
                      "def datasets():\n    return It(), It(), It()\n")


@pytest.mark.parametrize("case,args,message", [
    # (the first batch's labels: said as the data's, with the fix; was torch's "IndexError: Target 4 is out of bounds")
    ("targets out of range", lambda t: [_write(t / "m.py", LABELS_OUT_OF_RANGE)],
     "the training dataset has class label 4, but the model outputs 2 classes (labels 0..1, or -100 to leave a sample "
     "out): fix the labels or the model's number of outputs"),
    ("float class labels", lambda t: [_write(t / "m.py", GOOD.replace("torch.arange(8) % 2", "(torch.arange(8) % 2).float()"))],
     "the training targets are floats (torch.float32) where the built-in cross-entropy takes class indices: yield "
     "integer labels (y.long()), or set TASK = \"regression\""),
    ("dict samples", lambda t: [_write(t / "m.py", GOOD.replace(
        "    return d, d, d", "    d = [{'x': x, 'y': y} for x, y in d]\n    return d, d, d"))],
     "each batch must be a tuple (inputs..., target), and the samples are dicts (keys 'x', 'y'): return (input, ..., "
     "target) tuples from the dataset, or give the model file a collate_fn"),
    ("(x, y) arrays for datasets", lambda t: [_write(t / "m.py", GOOD.replace(
        "    return d, d, d", "    return tuple(v.numpy() for v in d.tensors), d, d"))],
     "the training dataset is a tuple of arrays, not of (input, target) samples: wrap them, "
     "TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y))"),
    ("data of another shape", lambda t: [_write(t / "m.py", LABELS_OUT_OF_RANGE.replace("randn(8, 3)", "randn(8, 6)"))],
     "check that the data's shapes, dtypes and targets match the model"),
    ("example inputs without a tensor", lambda t: [_write(t / "m.py", GOOD.replace(
        "def example_inputs(): return (torch.randn(2, 3),)", "def example_inputs(): return [[1, 2, 3]]"))],
     "returned [[1, 2, 3]], which holds no tensor: return the model's inputs as tensors"),
    ("classes on the last dim of a [B, T, C] output", lambda t: [_write(t / "m.py", TAGGER)],
     "the built-in loss and accuracy read the classes from dim 1 ([N, C, ...], as F.cross_entropy)"),
    # (its labels beyond T were refused as 'class label 8, but the model outputs 7 classes')
    ("more classes than positions in a [B, T, C] output", lambda t: [_write(t / "m.py", TAGGER.replace(
        "nn.Linear(8, 5)", "nn.Linear(8, 9)").replace("x % 5", "x % 9"))],
     "the built-in loss and accuracy read the classes from dim 1 ([N, C, ...], as F.cross_entropy)"),
    ("one logit per sample with the built-in accuracy", lambda t: [_write(t / "m.py", ONE_LOGIT)],
     "the built-in accuracy scores class logits [N, C, ...] with C >= 2 classes on dim 1"),
    ("DataLoaders for datasets", lambda t: [_write(t / "m.py", GOOD.replace(
        "    return d, d, d", "    from torch.utils.data import DataLoader\n    return DataLoader(d), d, d"))],
     "datasets() returned a DataLoader for the training data: return the Dataset itself"),
    ("an iterable dataset with a length", lambda t: [_write(t / "m.py", ITERABLE.replace(
        "class It(IterableDataset):\n", "class It(IterableDataset):\n    def __len__(self): return 8\n"))],
     "the training dataset is an IterableDataset: datasets() must return map-style"),
    ("(x, y) tensor pairs for datasets", lambda t: [_write(t / "m.py", GOOD.replace(
        "    return d, d, d", "    return d.tensors, d, d"))],
     "the training dataset is a tuple of tensors, not of (input, target) samples: wrap them, TensorDataset(x, y)"),
    ("a dataset whose length is one too long", lambda t: [_write(t / "m.py", GOOD.replace(
        "    return d, d, d", "    class Long(torch.utils.data.Dataset):\n        def __len__(self): return 9\n"
        "        def __getitem__(self, i): return d[i]\n    return Long(), d, d"))],
     "the training dataset raised an error reading sample 8 of its 9 (IndexError"),
    ("class names as labels", lambda t: [_write(t / "m.py", GOOD.replace(
        "    return d, d, d", "    d = [(x, 'cat' if y else 'dog') for x, y in d]\n    return d, d, d"))],
     "the training targets are strings ('dog', ...), not numbers: map each class name to an integer label"),
    ("a collate_fn that raises", lambda t: [_write(t / "m.py", GOOD + (
        "def collate_fn(samples):\n    return torch.stack([s['x'] for s in samples]), None\n"))],
     "the model file's collate_fn raised TypeError: tuple indices must be integers or slices, not str on the first "
     "training samples: fix collate_fn"),
    # (accuracy scored the first head, which no loss trained, and picked the best epoch by it)
    ("the built-in accuracy on a head the loss does not read", lambda t: [_write(t / "m.py", TWO_HEADS)],
     "the built-in accuracy scores output['aux'] (a dict's 'logits', else its first tensor; a tuple's first), which "
     "the model file's loss_fn does not train: define metric(output, target)"),
    # (the dtype diagnosis read `inputs` before any batch had been made: an internal UnboundLocalError)
    ("samples of different lengths", lambda t: [_write(t / "m.py", GOOD.replace(
        "    return d, d, d", "    d = [(torch.randn(3 + i % 2), i % 2) for i in range(8)]\n    return d, d, d"))],
     "the first training samples do not batch (RuntimeError: stack expects each tensor to be equal size, but got [3] at "
     "entry 0 and [4] at entry 1): torch's default batching stacks samples of one shape; give the model file a "
     "collate_fn(samples) that makes a batch of them (e.g. pads sequences to one length)"),
    # (float64 inputs were blamed where the model casts them itself and the shapes are what is wrong)
    ("a model that casts its inputs, given the wrong shape", lambda t: [_write(t / "m.py", GOOD.replace(
        "torch.randn(8, 3)", "torch.randn(8, 5, dtype=torch.float64)").replace(
        "def build_model(): return torch.nn.Linear(3, 2)", "class Cast(torch.nn.Linear):\n"
        "    def forward(self, x): return super().forward(x.float())\ndef build_model(): return Cast(3, 2)"))],
     "(RuntimeError: mat1 and mat2 shapes cannot be multiplied (8x5 and 3x2))"),
    # (was torch's "mat1 and mat2 must have the same dtype, but got Double and Float", with no fix)
    ("float64 inputs for a float32 model", lambda t: [_write(t / "m.py", GOOD.replace(
        "torch.randn(8, 3)", "torch.randn(8, 3, dtype=torch.float64)"))],
     "the training inputs are torch.float64 where the model's parameters are torch.float32: make the datasets yield "
     "torch.float32 inputs (torch.as_tensor(x, dtype=torch.float32), or numpy's x.astype('float32'))"),
    ("unknown TASK", lambda t: [_write(t / "m.py", BAD_TASK)], "TASK = 'ranking' is not one of classification, regression"),
    ("missing model file", lambda t: ["/nonexistent/model.py"], "does not exist"),
    ("NaN in validation data", lambda t: [_write(t / "m.py", NAN_VAL)], "validation data holds NaN/Inf"),
    ("no datasets()", lambda t: [_write(t / "m.py", NO_DATA)], "has no datasets()"),
    ("datasets a value", lambda t: [_write(t / "m.py", NO_DATA + "datasets = 3\n")],  # (it said "has no datasets()")
     "sets datasets to a value (int), not a function: training needs datasets()"),
    ("empty dataset", lambda t: [_write(t / "m.py", EMPTY)], "dataset is empty"),
    ("bad test data", lambda t: [_write(t / "m.py", BAD_TEST_DATA)], "the first test samples fail in the model"),
    ("regression targets of another shape", lambda t: [_write(t / "m.py", FLAT_REGRESSION_TARGETS)],
     "output shape [8, 1] and target shape [8] differ"),
    # (both were torch's "Boolean value of Tensor ... is ambiguous" / "0D or 1D target tensor expected", no fix)
    ("a loss class, not a loss", lambda t: [_write(t / "m.py", GOOD + "loss_fn = torch.nn.CrossEntropyLoss\n")],
     "loss_fn = CrossEntropyLoss is a class, not a loss_fn: give an instance (loss_fn = CrossEntropyLoss())"),
    ("labels of shape [N, 1]", lambda t: [_write(t / "m.py", GOOD.replace("torch.arange(8) % 2)", "(torch.arange(8) % 2)[:, None])"))],
     "the training labels have shape [8, 1], where the built-in cross-entropy takes one class index per sample, [8]: "
     "yield y.squeeze(1)"),
    ("a metric without a count", lambda t: [_write(t / "m.py", GOOD + "def metric(o, y): return 0.5\n")],
     "metric returned float, not a (sum, count) pair"),
    ("a loss of one number per sample", lambda t: [_write(t / "m.py", GOOD + (
        "import torch.nn.functional as F\ndef loss_fn(o, y): return F.cross_entropy(o, y, reduction='none')\n"))],
     "the loss_fn returns a tensor of shape [8] on the first training samples, not one number: reduce it"),
    ("a class label beyond the outputs after the first samples", lambda t: [_write(t / "m.py", LATE_LABEL)],
     "the validation dataset has class label 2, but the model outputs 2 classes"),
    # (random_split's Subsets were not looked into: training started and stopped at "Target 2 is out of bounds")
    ("a class label beyond the outputs in a random_split subset", lambda t: [_write(t / "m.py", LATE_LABEL.replace(
        "    return TensorDataset(x, y), TensorDataset(x, bad), TensorDataset(x, y)\n",
        "    parts = torch.utils.data.random_split(TensorDataset(x, bad), [20, 20], torch.Generator().manual_seed(0))\n"
        "    return parts[0], parts[1], TensorDataset(x, y)\n"))],
     "dataset has class label 2, but the model outputs 2 classes"),
    ("batches of one sample with BatchNorm", lambda t: [_write(t / "m.py", WITH_BATCHNORM), "--batch-size", "1"],
     "BatchNorm layer '1' would see one value per channel and cannot train: use --batch-size 2 or more"),
    ("an iterable dataset", lambda t: [_write(t / "m.py", ITERABLE)], "is an IterableDataset: datasets() must return map-style"),
    ("max_dendrites=0", lambda t: [DIGITS, "--max-dendrites", "0"], "at least 1"),
    ("epochs=0", lambda t: [DIGITS, "--epochs", "0"], "--epochs 0: must be at least 1"),
    ("a seed beyond 64 bits", lambda t: [DIGITS, "--seed", str(2**64)], "at most 9223372036854775807"),
    ("--out is a file", lambda t: [DIGITS, "--out", _write(t / "f", "x")], "not a directory"),
])
def test_train_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, args, message):
    argv = ["train", *args(tmp_path)]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert main(argv + ["--no-progress"]) == 2, case
    err = capsys.readouterr().err.strip()
    assert err.startswith("pbp-fx: error:") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,args", [
    (CONV_BATCHNORM, ["--batch-size", "1"]), (TOKENS, []),
    (GOOD.replace("torch.arange(8) % 2", "(torch.arange(8) % 2).int()"), []),
    (TWO_HEADS.replace("'aux': self.aux(x), 'cls'", "'cls': self.cls(x), 'aux'"), []),
    (TWO_HEADS.replace("o['cls']", "o['cls'] + o['aux']"), []),
    (TWO_HEADS.replace("{'aux': self.aux(x), 'cls': self.cls(x)}", "{'probs': self.cls(x).softmax(-1), 'cls': self.cls(x)}"),
     []),
    (GOOD.replace("torch.arange(8) % 2", "torch.from_numpy((torch.arange(8) % 2).numpy().astype('uint16'))"), []),
], ids=["batchnorm2d at batch 1", "token labels with the file's own loss", "int32 labels (numpy's)",
        "the head the loss reads first", "a loss that reads both heads", "probabilities before the logits the loss reads",
        "uint16 labels"])
def test_data_the_checks_must_not_refuse_trains(tmp_path, capsys, text, args):
    """A BatchNorm2d sees positions even in a batch of one sample; a model file with its own loss
    (token targets [B, T] against outputs [B, T, V]) has no class dim for the label check."""
    assert main(["train", _write(tmp_path / "m.py", text), "--epochs", "1", "--no-progress", "--out",
                 str(tmp_path / "run"), *args]) == 0


def test_a_metric_of_tensors_trains_and_writes_numbers(tmp_path, capsys):
    import json

    out = tmp_path / "out"
    assert main(["train", _write(tmp_path / "m.py", TENSOR_METRIC), "--out", str(out), "--epochs", "2",
                 "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert isinstance(summary["val"], float) and summary["metric"] == "metric"


def test_console_script_reports_errors_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pbp_fx", "train", str(tmp_path / "nope.py")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "does not exist" in r.stderr


@pytest.mark.slow  # (default suite under ~10 minutes: two CLI runs; an interrupted resume stays in the default suite)
def test_killed_in_the_dendrite_phase_and_resumed_ends_like_an_uninterrupted_run(tmp_path, monkeypatch):
    from pbp_fx.checkpoint import read_structure

    monkeypatch.chdir(ROOT)  # the model file by a relative path, as users type it
    # A long dendrite phase (capped at 40 epochs) leaves time to kill the process inside it.
    args = [os.path.relpath(DIGITS), "--max-dendrites", "1", "--patience", "10", "--dendrite-patience", "40",
            "--max-dendrite-epochs", "40", "--no-progress", "--seed", "0"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(["train", *args, "--out", str(whole)]) == 0
    ckpt = _kill_train_when(args, killed, lambda c: read_structure(str(c))["phase"] == "dendrite", poll=0.02,
                            why="the run ended before it could be killed in the dendrite phase")
    assert read_structure(str(ckpt))["phase"] == "dendrite"
    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0
    _same_final_model(whole, killed)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_cuda
def test_a_run_on_the_gpu_killed_in_the_dendrite_phase_resumes_on_the_gpu_like_an_uninterrupted_run_or_on_the_cpu(
        tmp_path, monkeypatch):
    from pbp_fx.checkpoint import read_structure

    monkeypatch.chdir(ROOT)
    # Dropout draws from the GPU's generator: a resume must restore it too.
    model_file = tmp_path / "digits_dropout.py"
    model_file.write_text("from torch import nn\n"
                          "from pbp_fx.models.digits_mlp import datasets, example_inputs  # noqa: F401\n\n\n"
                          "def build_model():\n"
                          "    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 16),\n"
                          "                         nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 10))\n")
    args = [str(model_file), "--max-dendrites", "1", "--patience", "10", "--dendrite-patience", "40",
            "--max-dendrite-epochs", "40", "--no-progress", "--seed", "0", "--device", "cuda"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(["train", *args, "--out", str(whole)]) == 0
    assert json.loads((whole / "summary.json").read_text())["device"].startswith("cuda")
    ckpt = _kill_train_when(args, killed, lambda c: read_structure(str(c))["phase"] == "dendrite", poll=0.02,
                            why="the run ended before it could be killed in the dendrite phase")
    on_cpu = tmp_path / "on_cpu"
    import shutil

    shutil.copytree(killed, on_cpu)
    done = _epochs_done(on_cpu / "checkpoint.safetensors")
    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0  # (its own device: the GPU)
    _same_final_model(whole, killed)
    assert main(["train", "--resume", str(on_cpu), "--no-progress", "--device", "cpu"]) == 0
    summary = json.loads((on_cpu / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["devices"] == ["cpu", "cuda"] and summary["epochs"] > done


def _kill_train_when(args: list, out, ready, poll: float, why: str):
    """Run `pbp-fx train ARGS --out OUT` in a process, SIGKILL it once ready(checkpoint path)
    holds; returns the checkpoint path."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pbp_fx", "train", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    ckpt = out / "checkpoint.safetensors"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists() and ready(ckpt):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(poll)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, why
    return ckpt


def test_resume_errors(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert main(["train", DIGITS, "--resume", str(tmp_path), "--no-progress"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert main(["train", DIGITS, "--resume", str(tmp_path), "--epochs", "3"]) == 2
    assert "(--epochs given): give --resume DIR alone (and the model file, if it moved)" in capsys.readouterr().err


def test_a_run_folder_that_cannot_be_written_is_refused_with_a_fix_resume_takes(tmp_path):
    """A read-only run folder: the refusal named --out (not given) and said 'choose another path', and
    --resume refuses --out."""
    import shutil
    import stat
    import subprocess
    import sys

    model = _write(tmp_path / "good.py", GOOD)
    run = tmp_path / "run"
    assert main(["train", model, "--out", str(run), "--epochs", "1", *FAST]) == 0
    command = [sys.executable, "-m", "pbp_fx", "train", "--resume", str(run), "--no-progress"]
    if os.geteuid() == 0:  # (root writes anywhere: drop its override of file permissions)
        if shutil.which("capsh") is None:
            pytest.skip("root without capsh ignores directory permissions")
        command = ["capsh", "--drop=cap_dac_override,cap_dac_read_search,cap_fowner", "--", "-c",
                   " ".join(f"'{c}'" for c in command)]
    os.chmod(run, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        r = subprocess.run(command, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    finally:
        os.chmod(run, stat.S_IRWXU)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "nothing can be written in the run folder (Permission denied); copy it " \
        "somewhere writable and resume the copy" in r.stderr, r.stderr
    assert "--out" not in r.stderr


def test_a_moved_run_resumes_with_its_model_files_new_path_and_an_edited_file_is_named(tmp_path, capsys):
    """A project folder renamed: the run's absolute model-file path was gone, and a model file given
    with --resume was refused, so the run could not be resumed at all. An edited model file or
    other data resumed silently."""
    import shutil

    a = tmp_path / "a"
    a.mkdir()
    assert main(["train", _write(a / "m.py", GOOD), "--out", str(a / "run"), "--epochs", "2", "--batch-size", "32",
                 "--no-progress"]) == 0
    shutil.move(str(a), str(tmp_path / "b"))
    run, model = tmp_path / "b" / "run", tmp_path / "b" / "m.py"
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"the run's model file {a / 'm.py'} does not exist (moved or renamed?): give its path, pbp-fx train FILE " \
           f"--resume {run}" in err and err.count("\n") == 1
    assert main(["train", str(model), "--resume", str(run), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "is complete" in captured.out and "changed since it started" not in captured.err
    # Complete, with another model file: its report was made again of that file's model, beside the
    # checkpoint of the run's (the folder contradicted itself). Refused; nothing rewritten.
    report = (run / "summary.json").read_bytes()
    model.write_text(GOOD + "\n# edited\n")
    assert main(["train", str(model), "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"the run in {run} is complete, and its model file changed since it started" in err and err.count("\n") == 1
    assert (run / "summary.json").read_bytes() == report


def test_an_unfinished_run_resumed_with_an_edited_model_file_is_warned_of(tmp_path, monkeypatch, capsys):
    out = _interrupted_at_third_save(tmp_path, monkeypatch, "--epochs", "4")
    (tmp_path / "m.py").write_text(GOOD + "\n# edited\n")
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert "the run's model file changed since it started" in capsys.readouterr().err
    # Its epochs are of two models: compare --pb-run took it as the run of the file it started with
    # (its identity was the start's), also once the file was restored.
    (tmp_path / "m.py").write_text(GOOD)
    assert main(["compare", "--pb-run", str(out), "--arms", "plain", "--no-latency"]) == 2
    err = capsys.readouterr().err
    assert f"--pb-run {out}: that run was resumed on another model file than it started with" in err
    assert err.count("\n") == 1


def test_a_resume_runs_on_the_runs_own_process_count_unless_told_otherwise(tmp_path, monkeypatch, capsys):
    """A --nproc 2 run resumed without --nproc continued on one process with another data order, silently."""
    from pbp_fx import distributed, job
    from pbp_fx.job import SavedRun

    launched = []
    monkeypatch.setattr(distributed, "launch", lambda n, argv, quiet=True: launched.append((n, argv)) or
                        distributed.Launched(0, 0))
    monkeypatch.setattr(job, "saved_run", lambda _d: SavedRun(None, pbp_fx.PBConfig(), pbp_fx.TrainConfig(), None,
                                                               None, 2, None))
    assert main(["train", "--resume", str(tmp_path)]) == 0
    assert launched[-1][0] == 2 and "--resume" in launched[-1][1]
    with pytest.warns(UserWarning, match=r"the run trained on 2 process\(es\) and resumes on 1: the data is dealt "
                                         r"otherwise from here on \(resume with --nproc 2 to continue it exactly\)"):
        job._warn_resumed_otherwise(SavedRun(None, pbp_fx.PBConfig(), pbp_fx.TrainConfig(), None, None, 2, None),
                                    {"model_digest": None, "data": "x"}, 1, torch.device("cpu"))


def _interrupted_at_third_save(tmp_path, monkeypatch, *flags):
    """The run folder of `pbp-fx train GOOD ... flags` stopped by Ctrl-C inside its third checkpoint save."""
    from pbp_fx import job

    real, calls = job.save, []

    def interrupted_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(job, "save", interrupted_third)
    out = tmp_path / "run"
    assert main(["train", _write(tmp_path / "m.py", GOOD), "--out", str(out), *flags, "--no-progress"]) == 130
    monkeypatch.setattr(job, "save", real)
    return out


def test_a_run_keeps_the_most_processes_it_trained_on_over_its_resumes(tmp_path, monkeypatch, capsys):
    """A run trained on 2 processes and resumed on 1 recorded 1 process: compare --pb-run then paired its
    controls with it, though its first epochs had the 2-process data order."""
    import dataclasses

    from pbp_fx import job
    from pbp_fx.checkpoint import read_meta

    out = _interrupted_at_third_save(tmp_path, monkeypatch, "--epochs", "4")
    real_saved = job._saved_job  # its first epochs as if on 2 processes
    monkeypatch.setattr(job, "_saved_job", lambda path: dataclasses.replace(real_saved(path), processes=2))
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--nproc", "1", "--no-progress"]) == 0
    assert "the run trained on 2 process(es) and resumes on 1" in capsys.readouterr().err
    state = read_meta(str(out / "checkpoint.safetensors"))["extra"]["job_state"]
    assert state["processes"] == 1 and state["most_processes"] == 2
    capsys.readouterr()
    assert main(["compare", "--pb-run", str(out), "--no-latency"]) == 2
    assert "that run trained in 2 processes (train --nproc 2) for some or all of its epochs" in capsys.readouterr().err


def _epochs_done(ckpt) -> int:
    from pbp_fx.checkpoint import read_meta

    try:
        return len(read_meta(str(ckpt))["extra"]["job_state"]["history"]["epochs"])
    except pbp_fx.CheckpointError:  # not there yet
        return 0


def _same_final_model(a_dir, b_dir):
    from safetensors.torch import load_file

    a = load_file(str(a_dir / "checkpoint.safetensors"))
    b = load_file(str(b_dir / "checkpoint.safetensors"))
    model = sorted(k for k in a if k.startswith("model/"))
    assert model == sorted(k for k in b if k.startswith("model/"))
    assert all(torch.equal(a[k], b[k]) for k in model)
    sa = json.loads((a_dir / "summary.json").read_text())
    sb = json.loads((b_dir / "summary.json").read_text())
    keys = ("val", "test", "dendrites", "epochs", "model")  # (model: a relative path became absolute after a resume)
    assert [sa[k] for k in keys] == [sb[k] for k in keys]


@pytest.mark.slow
def test_built_in_default_model_killed_at_a_random_epoch_resumes_like_an_uninterrupted_run(tmp_path):
    import random

    args = ["--epochs", "14", "--patience", "2", "--dendrite-patience", "2", "--max-dendrite-epochs", "3",
            "--max-dendrites", "2", "--no-progress"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(["train", *args, "--out", str(whole)]) == 0
    total = json.loads((whole / "summary.json").read_text())["epochs"]
    kill_after = random.Random(os.getpid()).randint(1, total - 1)
    _kill_train_when(args, killed, lambda c: _epochs_done(c) >= kill_after, poll=0.01,
                     why=f"the run ended before epoch {kill_after}")
    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0
    _same_final_model(whole, killed)


def test_resuming_a_finished_run_reports_it_complete_and_exits_0(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", DIGITS, "--out", str(out), "--epochs", "40", "--patience", "2", "--dendrite-patience", "1",
                 "--max-dendrite-epochs", "2", "--max-dendrites", "1", "--retries", "0", "--no-progress"]) == 0
    before = (out / "checkpoint.safetensors").read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] < 40, "the run must end by its schedule, not the epoch cap"
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"the run in {out} is complete" in printed
    again = json.loads((out / "summary.json").read_text())
    assert (again["val"], again["test"], again["epochs"]) == (summary["val"], summary["test"], summary["epochs"])
    assert again["seconds"] == summary["seconds"]  # the run's own time, not the resume's
    # The checkpoint is left as it was (it was rewritten, with the resume's random state and a new checksum).
    assert (out / "checkpoint.safetensors").read_bytes() == before


def test_train_frontend_is_recorded_and_the_checkpoint_loads_without_inputs(tmp_path):
    from pbp_fx.checkpoint import read_meta

    out = tmp_path / "run"
    assert main(["train", DIGITS, "--out", str(out), "--epochs", "2", "--frontend", "export", "--no-progress"]) == 0
    path = str(out / "checkpoint.safetensors")
    meta = read_meta(path)
    assert meta["capture"]["frontend"] == "export" == meta["capture"]["captured_with"]
    assert meta["model"] == DIGITS and meta["config"] == pbp_fx.PBConfig().to_dict()
    mod = pbp_fx.job.load_job_module(DIGITS)
    pm = pbp_fx.load(path, mod.build_model)
    assert pm.capture == meta["capture"]


def test_resuming_a_format_1_run_is_refused_in_one_line(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from pbp_fx.checkpoint import _digest, read_meta

    run = tmp_path / "old"
    run.mkdir()
    pm = pbp_fx.perforate(torch.nn.Linear(3, 2), (torch.randn(2, 3),))
    path = str(run / "checkpoint.safetensors")
    pbp_fx.save(pm, path, extra={"job_state": {"args": {}, "model_file": DIGITS}})
    meta = read_meta(path)
    meta["format"] = "pbp-fx-checkpoint/1"
    tensors = load_file(path)
    meta["sha256"] = _digest(tensors, meta)
    save_file(tensors, path, metadata={"pbp_fx": json.dumps(meta)})
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pbp-fx-checkpoint/1" in err and "start a new run" in err


def test_a_malformed_job_state_is_refused_in_one_line_before_any_work(tmp_path, capsys):
    """A job state edited (or written by another version) and re-hashed: one line naming the checkpoint,
    exit 2 (it was "internal error: KeyError: 'args'", exit 1, or failed after the model was built)."""
    import base64

    pm = pbp_fx.perforate(torch.nn.Linear(3, 2), (torch.randn(2, 3),))
    args = {"config": pbp_fx.PBConfig().to_dict(), "training": pbp_fx.TrainConfig().to_dict(),
            "include": None, "exclude": None}
    good = {"args": args, "model_file": DIGITS, "history": {"epochs": [], "best_epoch": 0, "best_val": None},
            "seconds": 1.0, "rng": {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
                                    "loader": None}}
    cases = {
        "no_args": ({k: v for k, v in good.items() if k != "args"}, "job state is malformed (KeyError: 'args')"),
        "history": ({**good, "history": {"epochs": 3}}, "job state is malformed (TypeError"),
        "rng": ({**good, "rng": {"torch": "not base64!", "loader": None}}, "job state is malformed"),
        "unknown_setting": ({**good, "args": {**args, "config": {**args["config"], "bogus": 1}}},
                            "PBConfig has no setting 'bogus'"),
        "bad_value": ({**good, "args": {**args, "config": {**args["config"], "pool": 0}}}, "pool"),
        "include": ({**good, "args": {**args, "include": [1, 2]}}, "job state is malformed (include/exclude)"),
        "device": ({**good, "device": "tpu"}, "job state is malformed (ValueError: device)"),
        "cuda_rng": ({**good, "rng": {**good["rng"], "cuda": ["not base64!"]}}, "job state is malformed"),
    }
    for name, (state, message) in cases.items():
        run = tmp_path / name
        run.mkdir()
        path = str(run / "checkpoint.safetensors")
        pbp_fx.save(pm, path, extra={"job_state": state})
        before = sorted(os.listdir(run))
        assert main(["train", "--resume", str(run), "--no-progress"]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot resume from {path}" in err and message in err, (name, err)
        assert sorted(os.listdir(run)) == before


def _rewrite_job_state(path: str, edit) -> None:
    """Re-save the checkpoint at `path` with edit(job_state) in place of its job state (re-hashed)."""
    from safetensors.torch import load_file, save_file

    from pbp_fx.checkpoint import _digest, read_meta

    meta = read_meta(path)
    meta["extra"]["job_state"] = edit(meta["extra"]["job_state"])
    tensors = load_file(path)
    meta["sha256"] = _digest(tensors, meta)
    save_file(tensors, path, metadata={"pbp_fx": json.dumps(meta)})


def test_a_run_keeps_its_device_and_a_resume_on_another_is_refused_or_warned_of(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    run = tmp_path / "run"
    args = [DIGITS, "--epochs", "40", "--patience", "40", "--no-progress"]
    path = _kill_train_when(args, run, lambda c: _epochs_done(c) >= 1, poll=0.02, why="the run ended before epoch 1")
    from pbp_fx.checkpoint import read_meta

    state = read_meta(str(path))["extra"]["job_state"]
    assert state["device"] == "cpu" and state["devices"] == ["cpu"] and "cuda" not in state["rng"]
    _rewrite_job_state(str(path), lambda job: {**job, "device": "cuda", "devices": ["cuda"]})
    before = {f: os.path.getmtime(run / f) for f in os.listdir(run)}
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2  # (its own device: cuda)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda: this torch" in err and "use --device cpu" in err, err
    assert {f: os.path.getmtime(run / f) for f in os.listdir(run)} == before
    assert main(["train", "--resume", str(run), "--no-progress", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "the run trained on cuda and resumes on cpu: its arithmetic" in err, err
    assert "resume with --device cuda to continue it exactly" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["devices"] == ["cpu", "cuda"]
    assert read_meta(str(path))["extra"]["job_state"]["devices"] == ["cpu", "cuda"]
    # resumed again once complete (a report only): it trained nowhere new
    assert main(["train", "--resume", str(run), "--no-progress", "--device", "cpu"]) == 0
    assert json.loads((run / "summary.json").read_text())["devices"] == ["cpu", "cuda"]


def test_train_job_checks_its_device_before_any_work(tmp_path):
    from pbp_fx.job import train_job

    out = tmp_path / "run"
    for bad, message in (("meta", r"--device meta: use one of auto, cpu, cuda"),
                         (torch.device("meta"), r"--device meta: use one of auto, cpu, cuda"),
                         ("gpu", r"--device gpu: use one of auto, cpu, cuda")):
        with pytest.raises(pbp_fx.ConfigError, match=message):
            train_job(DIGITS, training=pbp_fx.TrainConfig(epochs=1), out=str(out), progress=False,
                      echo=lambda _s: None, device=bad)
        assert not out.exists()
    summary = train_job(DIGITS, training=pbp_fx.TrainConfig(epochs=1), progress=False, echo=lambda _s: None,
                        device="auto")
    assert summary["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")


REGRESSION = """
import torch
from torch import nn
from torch.utils.data import TensorDataset

TASK = "regression"


def build_model():
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))


def example_inputs():
    return (torch.randn(2, 4),)


def datasets(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(600, 4, generator=g)
    y = torch.stack([x[:, 0] * x[:, 1], torch.sin(2 * x[:, 2])], 1)
    return TensorDataset(x[:400], y[:400]), TensorDataset(x[400:500], y[400:500]), TensorDataset(x[500:], y[500:])
"""


def test_a_regression_model_file_is_scored_by_its_loss(tmp_path, capsys):
    """TASK = "regression": MSE by default, and the best epoch is the one of the least validation loss."""
    out = tmp_path / "run"
    assert main(["train", _write(tmp_path / "reg.py", REGRESSION), "--out", str(out), "--epochs", "12",
                 "--lr", "0.01", *FAST]) == 0
    assert "(minus the loss;" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    history = json.loads((out / "history.json").read_text())
    vals = [r["val"] for r in history["epochs"]]
    assert summary["metric"] == "minus the loss" and all(v < 0 for v in vals)
    assert summary["val"] == pytest.approx(max(vals), rel=1e-5) and max(vals) > vals[0]  # it learned, and kept the best


DICT_OUTPUT = NO_DATA.replace("return torch.nn.Linear(3, 2)", "return Net()") + """
from torch.utils.data import TensorDataset


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(3, 8), torch.nn.Linear(8, 2)

    def forward(self, x):
        return {"hidden": self.a(x), "logits": self.b(torch.relu(self.a(x)))}


def datasets(seed=0):
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(seed))
    d = TensorDataset(x, (x[:, 0] > 0).long())
    return d, d, d
"""


@pytest.mark.parametrize("structure", ["dict", "tuple"])
def test_structured_outputs_are_scored_by_their_logits(tmp_path, structure):
    text = DICT_OUTPUT if structure == "dict" else DICT_OUTPUT.replace(
        '{"hidden": self.a(x), "logits": self.b(torch.relu(self.a(x)))}', "(self.b(torch.relu(self.a(x))), self.a(x))")
    assert main(["train", _write(tmp_path / "m.py", text), "--out", str(tmp_path / "run"), "--epochs", "15",
                 "--lr", "0.05", "--batch-size", "16",
                 *FAST]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metric"] == "accuracy" and 0.5 < summary["val"] <= 1.0


def test_a_new_run_replaces_an_earlier_runs_outputs_and_a_failed_one_leaves_none(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.safetensors").write_text("an earlier run")
    for name in ("summary.json", "history.json", "plot.png", "compare.md"):  # (compare --pb-run wrote compare.*)
        (out / name).write_text("an earlier run")
    assert main(["train", _write(tmp_path / "m.py", GOOD), "--out", str(out), "--epochs", "2", "--no-progress"]) == 0
    assert ("holds an earlier run (checkpoint.safetensors, summary.json, history.json, plot.png, compare.md): this "
            "run replaces it" in capsys.readouterr().out)
    assert "an earlier run" not in (out / "summary.json").read_text() and not (out / "compare.md").exists()
    # A new run that fails before its first checkpoint leaves the earlier run as it was.
    before = {n: (out / n).read_bytes() for n in ("checkpoint.safetensors", "summary.json")}
    bad = GOOD + ("def loss_fn(o, y):\n    loss = torch.nn.functional.cross_entropy(o, y)\n"
                  "    return loss * float('nan') if torch.is_grad_enabled() else loss\n")
    assert main(["train", _write(tmp_path / "b.py", bad), "--out", str(out), "--no-progress"]) == 2
    assert {n: (out / n).read_bytes() for n in before} == before
    # A failure in the first epoch (a NaN training loss from the first training batch on; the checks before
    # training see a finite one) leaves no empty folder behind.
    nan = GOOD + ("graded = []\ndef loss_fn(o, y):\n    loss = torch.nn.functional.cross_entropy(o, y)\n"
                  "    graded.extend([1] if torch.is_grad_enabled() else [])\n"
                  "    return loss * float('nan') if len(graded) > 1 else loss\n")
    assert main(["train", _write(tmp_path / "n.py", nan), "--out", str(tmp_path / "nan"), "--no-progress"]) == 2
    assert "the loss is nan in the neuron phase" in capsys.readouterr().err
    assert not (tmp_path / "nan").exists()



def test_files_of_run_output_names_in_a_folder_that_holds_no_run_are_refused(tmp_path, capsys):
    """They may be the user's own (a fresh run deleted compare.md and overwrote history.json)."""
    (tmp_path / "history.json").write_text("mine")
    (tmp_path / "compare.md").write_text("mine")
    assert main(["train", _write(tmp_path / "m.py", GOOD), "--out", str(tmp_path), "--epochs", "2",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--out {str(tmp_path)!r} holds history.json, compare.md but no run (checkpoint.safetensors)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.md", "history.json", "m.py"]
    assert (tmp_path / "history.json").read_text() == "mine"


LATE_NAN_LOSS = ("calls = [0]\n\n\ndef loss_fn(o, y):\n    calls[0] += 1\n"
                 "    loss = torch.nn.functional.cross_entropy(o, y)\n"
                 "    return loss * float('nan') if torch.is_grad_enabled() and calls[0] > 20 else loss\n")
# A metric that turned NaN ended the run with 'the validation score is nan', no epoch, no report,
# and a checkpoint no resume could finish.
LATE_NAN_METRIC = ("calls = [0]\n\n\ndef metric(o, y):\n    calls[0] += 1\n"
                   "    right = float((o.argmax(-1) == y).sum())\n"
                   "    return (float('nan') if calls[0] > 12 else right), len(y)\n")


# A NaN gradient at call 21 (a finite loss): the weights diverge.
DIVERGING = ("calls = [0]\n\n\ndef loss_fn(o, y):\n    calls[0] += 1\n"
             "    loss = torch.nn.functional.cross_entropy(o, y)\n"
             "    return loss + torch.sqrt(o.sum() * 0) if torch.is_grad_enabled() and calls[0] == 21 else loss\n")


# A loss that stays NaN: the neuron phase takes it for diverged weights and goes back to its best ones,
# and the dendrite phase, whose model is frozen, meets it again and stops the run. The metric's NaN meets
# the test score first, which stops the run where it is.
@pytest.mark.parametrize("code, said, phase, diverged", [(LATE_NAN_LOSS, "the loss is nan", "dendrite", 1),
                                                         (LATE_NAN_METRIC, "score is nan in epoch", "neuron", 0)])
def test_a_value_gone_nan_mid_run_writes_the_report_of_the_restored_best_model(tmp_path, capsys, code, said, phase,
                                                                                diverged):
    """Exit 2 with one line; the report and checkpoint of the restored best model are written."""
    out = tmp_path / "run"
    assert main(["train", _write(tmp_path / "m.py", GOOD + code), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    error = err.splitlines()[-1]
    assert said in error and f"{phase} phase" in error and f"its report and that model are in {out}" in error
    assert "stopped and restored the best-validation model" in error
    assert ("the weights diverged, so the neuron phase ends here" in err) is bool(diverged)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["events"][-1]["note"] == "stopped: non-finite values"
    rows = json.loads((out / "history.json").read_text())["epochs"]
    assert summary["epochs"] == len(rows) >= 1 and all(r["val"] is None or math.isfinite(r["val"]) for r in rows)
    assert sum(r["val"] is None for r in rows) == diverged  # (the diverged epoch has no score)
    # The last row ends the run, as the summary's last event does (at that epoch).
    assert rows[-1]["decision"] == "complete" and summary["events"][-1]["epoch"] == rows[-1]["epoch"]


def test_a_run_whose_loss_goes_nan_once_after_a_best_goes_back_to_it_and_on(tmp_path, capsys):
    """pbp-fx train ended such a run with exit 2 at its best model, where PB's own loop and the
    trainers' callbacks go back to the best weights and on with a dendrite round."""
    out = tmp_path / "run"
    assert main(["train", _write(tmp_path / "m.py", GOOD + DIVERGING), "--out", str(out), "--no-progress",
                 "--max-dendrites", "1", "--epochs", "40"]) == 0
    err = capsys.readouterr().err
    assert "the weights diverged, so the neuron phase ends here" in err
    rows = json.loads((out / "history.json").read_text())["epochs"]
    diverged = [r for r in rows if r["val"] is None]
    assert len(diverged) == 1 and diverged[0]["decision"] == "restructured"
    assert any(r["phase"] == "dendrite" for r in rows) and rows[-1]["decision"] == "complete"
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["val"]) and (out / "plot.png").exists()


KEYWORD_MODEL = '''
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Embedding(4, 4), nn.Linear(10, 8), nn.Linear(8, 2)

    def forward(self, feats, mask=None, ids=None):  # SIGNATURE
        h = torch.cat([feats, self.emb(ids)], dim=1)
        return self.fc2(torch.relu(self.fc1(h)))


def build_model():
    return Net()


def example_inputs():
    return POSITIONAL


def example_kwargs():
    return KEYWORDS


def datasets(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, ids = torch.randn(300, 6, generator=g), torch.randint(0, 4, (300,), generator=g)
    y = ((x[:, 0] > 0) ^ (ids % 2 == 1)).long()
    parts = [(x[a:b], ids[a:b], y[a:b]) for a, b in ((0, 200), (200, 250), (250, 300))]
    return [TensorDataset(SAMPLE) for f, i, t in parts]
'''


@pytest.mark.parametrize("signature,positional,keywords,sample", [
    ("forward(self, feats, mask=None, ids=None)", "(torch.randn(2, 6),)", "{'ids': torch.zeros(2, dtype=torch.long)}",
     "f, i, t"),
    ("forward(self, feats, *, ids)", "(torch.randn(2, 6),)", "{'ids': torch.zeros(2, dtype=torch.long)}", "f, i, t"),
    ("forward(self, feats, mask=None, *, ids)", "()",
     "{'ids': torch.zeros(2, dtype=torch.long), 'feats': torch.randn(2, 6)}", "f, i, t"),
])
def test_a_model_file_with_keyword_inputs_trains(tmp_path, capsys, signature, positional, keywords, sample):
    """The samples' inputs went to forward by position: `ids` landed in `mask`, or a keyword-only
    input was refused ("takes 2 positional arguments but 3 were given")."""
    text = (KEYWORD_MODEL.replace("forward(self, feats, mask=None, ids=None)", signature)
            .replace("POSITIONAL", positional).replace("KEYWORDS", keywords).replace("SAMPLE", sample))
    path = tmp_path / "kw.py"
    path.write_text(text)
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--epochs", "3", "--no-progress"]) == 0
    assert "best validation epoch" in capsys.readouterr().out


def test_samples_that_do_not_fit_the_keyword_inputs_are_refused_in_one_line(tmp_path, capsys):
    text = (KEYWORD_MODEL.replace("POSITIONAL", "(torch.randn(2, 6),)")
            .replace("KEYWORDS", "{'ids': torch.zeros(2, dtype=torch.long)}").replace("SAMPLE", "f, t"))
    path = tmp_path / "kw.py"
    path.write_text(text)
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--epochs", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "yields samples of 2 values" in err and "yield 3 values" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


AUGMENTED = '''
import os
import random

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset


class Noisy(Dataset):
    """Augments with numpy's and Python's global generators; STOP_AT stops the run mid-way."""

    def __init__(self, x, y, train):
        self.x, self.y, self.train, self.calls = x, y, train, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.calls += 1
        if self.train and self.calls == int(os.environ.get("STOP_AT", "0")):
            raise KeyboardInterrupt
        x = self.x[i]
        if self.train:
            x = x + torch.from_numpy(np.random.normal(0, 0.3, x.shape).astype("float32")) + random.random()
        return x, self.y[i]


def build_model():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


def example_inputs():
    return (torch.randn(2, 6),)


def datasets(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(240, 6, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long()
    idx = np.random.permutation(240)  # a split by numpy's generator too
    x, y = x[idx], y[idx]
    return Noisy(x[:160], y[:160], True), Noisy(x[160:200], y[160:200], False), Noisy(x[200:], y[200:], False)
'''


def test_a_run_whose_data_draws_from_numpy_and_random_resumes_like_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    """numpy's and Python's generators were neither seeded nor saved: such a run differed from epoch 1
    between two runs, and a resumed one from the uninterrupted one."""
    path = tmp_path / "noisy.py"
    path.write_text(AUGMENTED)
    args = [str(path), "--max-dendrites", "1", "--patience", "2", "--dendrite-patience", "2", "--epochs", "12",
            "--batch-size", "40", "--no-progress"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main(["train", *args, "--out", str(whole)]) == 0
    monkeypatch.setenv("STOP_AT", str(160 * 5 + 20 + 16))  # inside epoch 6 (the fingerprint reads 2 x 8 first)
    capsys.readouterr()
    assert main(["train", *args, "--out", str(stopped)]) == 130
    assert capsys.readouterr().err.endswith(f"interrupted after epoch 5; the run so far resumes with pbp-fx train "
                                            f"--resume {stopped} --no-progress\n")
    monkeypatch.delenv("STOP_AT")
    from pbp_fx.checkpoint import read_meta

    done = read_meta(str(stopped / "checkpoint.safetensors"))["extra"]["job_state"]["history"]["epochs"]
    assert len(done) == 5  # (the preflight read 8 samples first, the fingerprint 16)
    # Stopped again in the resume's start-up (the preflight's reads): the message named no resume command (a reviewer)
    monkeypatch.setenv("STOP_AT", "3")
    assert main(["train", "--resume", str(stopped), "--no-progress"]) == 130
    assert capsys.readouterr().err.endswith(f"interrupted before the resumed run saved an epoch (its checkpoint is as "
                                            f"it was); it resumes with pbp-fx train --resume {stopped} --no-progress\n")
    monkeypatch.delenv("STOP_AT")
    assert main(["train", "--resume", str(stopped), "--no-progress"]) == 0
    _same_final_model(whole, stopped)


def test_the_dendrites_table_stays_aligned_for_long_site_names():
    from pbp_fx.job import _print_report

    lines = []
    names = {"fc": 1, "encoder.layer.10.attention.output.dense": 2, "classifier": 0}
    summary = {"events": [], "dendrites": names, "params_plain": 1, "params": 2, "best_epoch": 1, "epochs": 1,
               "val": 0.5, "test": 0.5, "seconds": 1.0, "mode": "pb"}
    _print_report(summary, lines.append)
    rows = lines[lines.index("dendrites per site") + 1:][:3]
    assert len({len(r.rstrip("0123456789")) for r in rows}) == 1, rows


FLAG_ONLY = '''
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 2)

    def forward(self, x, *, temperature=1.0):
        return self.fc2(torch.relu(self.fc1(x))) / temperature


def build_model():
    return Net()


def example_inputs():
    return (torch.randn(2, 6),)


def example_kwargs():
    return {"temperature": 4.0}


def datasets(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 6, generator=g)
    y = (x[:, 0] > 0).long()
    return TensorDataset(x[:120], y[:120]), TensorDataset(x[120:160], y[120:160]), TensorDataset(x[160:], y[160:])
'''


def test_a_keyword_input_that_is_only_a_flag_is_passed_at_its_example_value(tmp_path, capsys):
    """With no tensor among the keyword inputs they were dropped: the graph traced at temperature=4.0
    refused the calls at the default 1.0 after the preflight."""
    path = tmp_path / "flag.py"
    path.write_text(FLAG_ONLY)
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--epochs", "2", "--no-progress"]) == 0


def test_the_plain_count_leaves_out_a_module_forward_never_calls(tmp_path, capsys):
    """train reported "params: 4032 plain -> 3006 perforated (0.75x)": its plain count held a module
    forward never calls, its perforated count did not."""
    text = GOOD.replace("def build_model(", "class _Spare(torch.nn.Module):\n    pass\n\n\ndef build_model(", 1)
    spare = ("    model = build_model_inner()\n    model.spare = torch.nn.Linear(40, 40)\n    return model\n")
    text = text.replace("def build_model(", "def build_model_inner(", 1) + "\n\ndef build_model():\n" + spare
    out = tmp_path / "run"
    assert main(["train", _write(tmp_path / "m.py", text), "--out", str(out), "--epochs", "2", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params_plain"] <= summary["params"]


def test_without_matplotlib_the_plots_are_skipped_with_a_warning(tmp_path, monkeypatch):
    """matplotlib is in the train extra only: its absence ended a finished run with an internal error."""
    import sys

    from pbp_fx.compare import plot
    from pbp_fx.job import plot_history

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.warns(UserWarning, match="plot.png not written: matplotlib is not installed"):
        assert plot_history(None, str(tmp_path / "plot.png")) is False
    with pytest.warns(UserWarning, match="compare.png not written"):
        assert plot([], str(tmp_path / "compare.png")) is False
    assert list(tmp_path.iterdir()) == []


def test_the_resume_hint_of_a_multi_process_run_keeps_its_process_count():
    """After a --nproc 2 interrupt the hint said `pbp-fx train --resume DIR`, which resumed on one process
    with another data order, silently."""
    from pbp_fx.job import _resumes

    assert _resumes("runs/a b", 3, 2) == "; the run so far resumes with pbp-fx train --resume 'runs/a b' --nproc 2"
    assert _resumes("runs/a", 3) == "; the run so far resumes with pbp-fx train --resume runs/a"
    assert _resumes("runs/a", 0, 2) == ""
    # (--no-progress is no setting the checkpoint keeps: the hint carries it, as the process count)
    assert _resumes("runs/a", 3, 1, progress=False) == "; the run so far resumes with pbp-fx train --resume runs/a " \
                                                       "--no-progress"


def test_resume_on_a_process_count_that_cannot_split_the_runs_batch_is_refused_before_any_process(tmp_path, capsys):
    """`--resume DIR --nproc 3` on a run with batch 32 failed on every rank, each advising another
    --batch-size, which a resume cannot take; a folder that is no run failed on every rank too."""
    out = tmp_path / "run"
    assert main(["train", _write(tmp_path / "m.py", GOOD), "--out", str(out), "--epochs", "1", "--batch-size", "32",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--nproc", "3"]) == 2
    err = capsys.readouterr().err
    assert ("--nproc 3: the run in" in err and "global batch of 32" in err and "an --nproc that divides it" in err
            and err.count("\n") == 1 and "rank" not in err)
    assert main(["train", "--resume", str(tmp_path), "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "does not exist" in err and err.count("\n") == 1 and "rank" not in err


def test_the_data_fingerprint_sees_changed_data_and_not_a_datasets_own_randomness():
    import random

    import numpy as np
    from torch.utils.data import TensorDataset

    from pbp_fx.job import data_fingerprint

    x = torch.arange(12.0).reshape(6, 2)
    base = data_fingerprint([TensorDataset(x, x[:, 0]), [(1, 2)], [(3, 4)]])
    assert base == data_fingerprint([TensorDataset(x.clone(), x[:, 0].clone()), [(1, 2)], [(3, 4)]])
    x2 = x.clone()
    x2[3, 1] += 1e-6
    assert base != data_fingerprint([TensorDataset(x2, x[:, 0]), [(1, 2)], [(3, 4)]])
    assert base != data_fingerprint([TensorDataset(x, x[:, 0]), [(1, 2)], [(3, 5)]])

    class Augmenting(torch.utils.data.Dataset):  # a generator of its own: each read differs
        rng = np.random.default_rng()

        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.tensor(self.rng.normal()), i

    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    assert data_fingerprint([Augmenting()]) == data_fingerprint([Augmenting()])
    assert torch.equal(states[0], torch.get_rng_state()) and (states[1] == np.random.get_state()[1]).all()
    assert states[2] == random.getstate()
    # what a resume cannot restore is recorded (a resume of such a run warns that it is not exact)
    from pbp_fx.job import run_identity

    assert run_identity(None, [Augmenting(), [(1, 2)], [(3, 4)]])["own_randomness"] == ["training"]
    assert run_identity(None, [[(1, 2)], [(1, 2)], [(3, 4)]])["own_randomness"] == []


def test_a_resume_of_a_run_whose_augmentation_has_its_own_generator_warns(tmp_path, capsys):
    """Augmentation from np.random.default_rng(seed) resumed silently into other samples."""
    own = GOOD.replace("def datasets():", (
        "import numpy as np\nclass Noisy(torch.utils.data.Dataset):\n"
        "    rng = np.random.default_rng(0)\n    def __init__(self, d): self.d = d\n"
        "    def __len__(self): return len(self.d)\n"
        "    def __getitem__(self, i):\n        x, y = self.d[i]\n"
        "        return x + float(self.rng.normal()), y\n"
        "def datasets():"))
    own = own.replace("    return d, d, d\n", "    return Noisy(d), d, d\n")
    model, run = _write(tmp_path / "m.py", own), str(tmp_path / "run")
    assert main(["train", model, "--out", run, "--epochs", "2", "--batch-size", "4", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", run, "--no-progress"]) == 0
    assert "augmentation drawn from a generator of the dataset's own" in capsys.readouterr().err


def test_an_interrupt_inside_a_checkpoint_write_names_the_epoch_the_checkpoint_holds(tmp_path, monkeypatch, capsys):
    """Ctrl-C during epoch 3's save said 'interrupted after epoch 3'; the checkpoint, and so the
    resume, held epoch 2."""
    out = _interrupted_at_third_save(tmp_path, monkeypatch, "--epochs", "5")
    assert "interrupted after epoch 2; the run so far resumes with" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert "after epoch 2 " in capsys.readouterr().out


def test_an_interrupt_while_the_report_is_written_says_so_and_how_to_write_it(tmp_path, monkeypatch, capsys):
    """Ctrl-C/SIGTERM after training, while the report was made, said only 'terminated': no epoch, and
    plot.png and summary.json were missing without a word."""
    from pbp_fx import job

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    real = job._write_outputs
    monkeypatch.setattr(job, "_write_outputs", interrupted)
    out = tmp_path / "run"
    assert main(["train", _write(tmp_path / "m.py", GOOD), "--out", str(out), "--epochs", "3", "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("pbp-fx: error: interrupted after training (3 epochs), before its report was all written; "
                          f"its checkpoint holds the run, and its report is written by pbp-fx train --resume {out}")
    assert not (out / "summary.json").exists()
    monkeypatch.setattr(job, "_write_outputs", real)
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert (out / "summary.json").exists()


def test_sigterm_stops_a_run_as_ctrl_c_does_with_the_resume_command(tmp_path):
    """`kill` (or a job scheduler's stop) ended a run with 'Terminated', exit 143 and no word of its
    checkpoint or how to resume it."""
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pbp_fx", "train", DIGITS, "--out", str(out), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None and not (out / "checkpoint.safetensors").exists():
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.startswith("pbp-fx: error: terminated after epoch ") and err.count("\n") == 1
    assert f"resumes with pbp-fx train --resume {out}" in err


def test_a_write_killed_midway_leaves_no_temporary_file_after_the_next_run(tmp_path, capsys):
    """SIGKILL inside a checkpoint write left `.checkpoint.safetensors.XXXX.tmp` (model-sized) for good."""
    out = tmp_path / "run"
    out.mkdir()
    leftover, other = out / ".checkpoint.safetensors.k2j4x1.tmp", out / ".my_notes.tmp"
    leftover.write_bytes(b"x" * 1000)
    other.write_text("not ours")
    assert main(["train", _write(tmp_path / "m.py", GOOD), "--out", str(out), "--epochs", "1", "--no-progress"]) == 0
    assert not leftover.exists() and other.exists()


def test_a_pool_that_cannot_fit_in_memory_is_refused_before_training(tmp_path, capsys):
    """--pool 1000000000000 was accepted, failed at the first dendrite phase, and the error blamed
    'the model file's model, data, loss or metric'."""
    out = tmp_path / "run"
    assert main(["train", _write(tmp_path / "m.py", GOOD), "--pool", "1000000000000", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pool=1000000000000, max_dendrites=3: the candidates need about" in err and "use a smaller --pool" in err
    assert err.count("\n") == 1 and not out.exists()
    # (the size came from max_dendrites: it said "use a smaller --pool" at pool 1)
    assert main(["train", _write(tmp_path / "m.py", GOOD), "--pool", "1", "--max-dendrites", "100000000000",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pool=1, max_dendrites=100000000000: the candidates need about" in err
    assert "use a smaller --max-dendrites" in err and not out.exists()
    oom = GOOD + ("calls = [0]\n\n\ndef loss_fn(o, y):\n    calls[0] += 1\n    if calls[0] > 30:\n"
                  "        raise RuntimeError(\"[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't "
                  "allocate memory: you tried to allocate 192000000000000 bytes.\")\n"
                  "    return torch.nn.functional.cross_entropy(o, y)\n")
    assert main(["train", _write(tmp_path / "o.py", oom), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "out of memory ([enforce fail" in err and "use a smaller --pool, --batch-size or model" in err
    assert "from the model file" not in err


def test_an_optimizer_the_model_file_defines_is_said_to_be_unread(tmp_path, capsys):
    """optimizer()/configure_optimizers() with AdamW and weight decay were silently ignored."""
    text = GOOD + "\n\ndef configure_optimizers(params):\n    return torch.optim.AdamW(params, weight_decay=0.1)\n"
    imported = "from torch.optim import lr_scheduler\n" + GOOD  # an import is no schedule of the file's own
    assert main(["train", _write(tmp_path / "i.py", imported), "--epochs", "1", "--out", str(tmp_path / "i"),
                 "--no-progress"]) == 0
    assert "do not read" not in capsys.readouterr().err
    assert main(["train", _write(tmp_path / "m.py", text), "--epochs", "1", "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "defines configure_optimizers, which pbp-fx train and compare do not read" in err and err.count("\n") == 1


def test_an_interrupt_before_a_new_runs_first_checkpoint_does_not_point_at_the_old_run(tmp_path, monkeypatch, capsys):
    """Ctrl-C inside a new run's first save, in a folder holding an earlier 160-epoch run, said
    'after epoch 160; ... resumes with --resume' (the other run)."""
    from pbp_fx import job

    out = tmp_path / "run"
    model = _write(tmp_path / "m.py", GOOD)
    assert main(["train", model, "--out", str(out), "--epochs", "3", "--no-progress"]) == 0

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "save", interrupted)
    capsys.readouterr()
    assert main(["train", model, "--out", str(out), "--epochs", "5", "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err == "pbp-fx: error: interrupted\n"


_SEQUENCES_DATASETS = """
def datasets():
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(48):
        x = torch.randint(1, 12, (3 + i % 5,), generator=g)
        data.append((x, int(x[0] > 6)))
    return data[:32], data[32:40], data[40:]
"""


def test_a_model_files_own_collate_fn_makes_its_batches(tmp_path):
    """Variable-length sequences: the file's collate_fn (padding per batch) was ignored, silently, and
    the run was refused with torch's 'stack expects each tensor to be equal size'."""
    model = _write(tmp_path / "seq.py", """
import torch
from torch import nn

class Mean(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(12, 8), nn.Linear(8, 2)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))

def build_model(): return Mean()
def example_inputs(): return (torch.randint(1, 12, (2, 5)),)

def collate_fn(samples):
    longest = max(len(x) for x, _ in samples)
    ids = torch.zeros(len(samples), longest, dtype=torch.long)
    for i, (x, _) in enumerate(samples):
        ids[i, :len(x)] = x
    return ids, torch.tensor([y for _, y in samples])
""" + _SEQUENCES_DATASETS)
    run = tmp_path / "run"
    assert main(["train", model, "--out", str(run), "--epochs", "2", "--batch-size", "8", "--no-progress"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["test"] <= 1.0 and summary["epochs"] == 2


_PADDED_WITH_MASK = """
import torch
from torch import nn

class Mean(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(12, 8), nn.Linear(8, 2)

    def forward(self, ids, *, mask):
        m = mask.unsqueeze(-1).to(torch.float32)
        return self.fc((self.emb(ids) * m).sum(1) / m.sum(1))

def build_model(): return Mean()
def example_inputs(): return (torch.randint(1, 12, (2, 5)),)
def example_kwargs(): return {"mask": torch.ones(2, 5, dtype=torch.long)}

def collate_fn(samples):
    longest = max(len(x) for x, _ in samples)
    ids = torch.zeros(len(samples), longest, dtype=torch.long)
    mask = torch.zeros(len(samples), longest, dtype=torch.long)
    for i, (x, _) in enumerate(samples):
        ids[i, :len(x)], mask[i, :len(x)] = x, 1
    return ids, mask, torch.tensor([y for _, y in samples])
""" + _SEQUENCES_DATASETS


def test_a_collate_fn_of_a_file_with_keyword_inputs_has_its_batches_called_by_keyword(tmp_path, capsys):
    """collate_fn's (ids, mask, y) went to the model as model(ids, mask): a keyword-only mask was
    refused ('takes 2 positional arguments but 3 were given') before any work."""
    model = _write(tmp_path / "seq.py", _PADDED_WITH_MASK)
    run = tmp_path / "run"
    assert main(["train", model, "--out", str(run), "--epochs", "2", "--batch-size", "8", "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2
    short = _write(tmp_path / "short.py", _PADDED_WITH_MASK.replace("return ids, mask, torch.tensor", "return ids, torch.tensor"))
    assert main(["train", short, "--out", str(tmp_path / "run2"), "--epochs", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "collate_fn returns batches of 2 values, but the model takes 1 positional input(s) (example_inputs) and " \
           "keyword input(s) mask (example_kwargs): return 3 values" in err and not (tmp_path / "run2").exists()


def test_a_collate_fn_that_groups_the_keyword_inputs_gets_the_files_constants_too(tmp_path):
    """collate_fn's (ids, {"mask": mask}, y) with a flag in example_kwargs: the flag was dropped
    ('missing 1 required keyword-only argument: flag')."""
    text = _PADDED_WITH_MASK.replace("def forward(self, ids, *, mask):", "def forward(self, ids, *, mask, flag):")
    text = text.replace('return {"mask": torch.ones(2, 5, dtype=torch.long)}',
                        'return {"mask": torch.ones(2, 5, dtype=torch.long), "flag": True}')
    text = text.replace("return ids, mask, torch.tensor", 'return ids, {"mask": mask}, torch.tensor')
    assert main(["train", _write(tmp_path / "m.py", text), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--no-progress"]) == 0


def test_a_grouped_dict_without_a_keyword_input_names_it(tmp_path, capsys):
    """A second tensor keyword the collate's dict leaves out read 'a sample is (input, ..., target),
    inputs not nested'."""
    text = _PADDED_WITH_MASK.replace("def forward(self, ids, *, mask):", "def forward(self, ids, *, mask, scale):")
    text = text.replace('return {"mask": torch.ones(2, 5, dtype=torch.long)}',
                        'return {"mask": torch.ones(2, 5, dtype=torch.long), "scale": torch.ones(2)}')
    text = text.replace("return ids, mask, torch.tensor", 'return ids, {"mask": mask}, torch.tensor')
    assert main(["train", _write(tmp_path / "m.py", text), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "the collate_fn's batches group keyword inputs 'mask' in a dict without 'scale', which " \
           "example_kwargs() has: add it to that dict" in capsys.readouterr().err


def test_a_collate_fn_that_returns_a_dict_is_told_the_batch_it_must_return(tmp_path, capsys):
    text = _PADDED_WITH_MASK.replace("return ids, mask, torch.tensor([y for _, y in samples])",
                                     'return {"ids": ids, "mask": mask, "y": torch.tensor([y for _, y in samples])}')
    assert main(["train", _write(tmp_path / "m.py", text), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "the model file's collate_fn returns a dict (keys 'ids', 'mask', 'y'): return a tuple (input, ..., " \
           "target), keyword inputs grouped in a dict before the target" in capsys.readouterr().err


def test_a_list_of_tensor_samples_is_a_dataset_when_the_file_has_its_own_collate_fn(tmp_path):
    """A list of tensors was refused as '(x, y) tensor pairs' even when the file's collate_fn makes
    (input, target) batches of them (a language model's sequences, targets shifted from inputs)."""
    model = _write(tmp_path / "lm.py", """
import torch
from torch import nn

class Next(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(6, 8), nn.Linear(8, 6)

    def forward(self, ids):
        return self.fc(self.emb(ids)).mean(1)

def build_model(): return Next()
def example_inputs(): return (torch.randint(0, 6, (2, 4)),)

def collate_fn(samples):
    ids = torch.stack(samples)
    return ids[:, :-1], ids[:, -1]

def datasets():
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 6, (5,), generator=g) for _ in range(40)]
    return data[:24], data[24:32], data[32:]
""")
    assert main(["train", model, "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "8",
                 "--no-progress"]) == 0


def test_targets_that_broadcast_against_the_output_under_an_own_loss_are_warned_of(tmp_path):
    """[N] targets beside an [N, 1] output with the file's own loss ((o - y).abs().mean()) trained on every pair of
    samples without a word: the run ended with a constant model (prediction sd 0.04 against the targets' 2.1)."""
    from pbp_fx.job import check_data
    from pbp_fx.modelfile import load_model_file

    own_loss = FLAT_REGRESSION_TARGETS + "def loss_fn(o, y): return (o - y).abs().mean()\n"
    mod = load_model_file(_write(tmp_path / "m.py", own_loss))
    data, model, inputs = mod.datasets(), mod.build_model(), mod.example_inputs()
    with pytest.warns(pbp_fx.PBWarning, match=r"^the model's output \[8, 1\] and its targets \[8\] broadcast to "
                                              r"\[8, 8\]: .*every pair of samples; give the targets the output's "
                                              r"shape \(y\[:, None\] for one output\)"):
        check_data(mod, data, model, inputs, 8)
    fitting = own_loss.replace("torch.randn(8))", "torch.randn(8, 1))")
    mod = load_model_file(_write(tmp_path / "fits.py", fitting))
    with warnings.catch_warnings():
        warnings.simplefilter("error", pbp_fx.PBWarning)
        check_data(mod, mod.datasets(), mod.build_model(), mod.example_inputs(), 8)


def test_batchnorm_at_one_sample_per_process_names_the_global_batch(tmp_path):
    """--nproc 2 --batch-size 2 gives each rank 1 sample: the check read the global batch, and every rank
    failed in its first step with torch's 'Expected more than 1 value per channel'."""
    from pbp_fx.errors import TrainingError
    from pbp_fx.job import check_data
    from pbp_fx.modelfile import load_model_file

    mod = load_model_file(_write(tmp_path / "m.py", WITH_BATCHNORM))
    data = mod.datasets()
    model, inputs = mod.build_model(), mod.example_inputs()
    check_data(mod, data, model, inputs, 2)  # one process: 2 samples a batch
    with pytest.raises(TrainingError, match=r"training batches of 1 sample per process: BatchNorm layer '1' .* use "
                                            r"--batch-size 4 or more for --nproc 2"):
        check_data(mod, data, model, inputs, 2, processes=2)


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder_it_made(tmp_path, capsys):
    """--out a/b/c of a run whose loss went NaN at once left a/ and a/b/ behind (only c was removed)."""
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "a" / "b" / "c"
    nan_at_once = GOOD + "\n\ndef loss_fn(o, y):\n    return o.sum() * float('nan')\n"
    assert main(["train", _write(tmp_path / "m.py", nan_at_once), "--out", str(out), "--no-progress"]) == 2
    assert "the loss is nan" in capsys.readouterr().err
    assert os.listdir(tmp_path / "kept") == []  # (a folder that was there stays)


def test_export_of_a_run_whose_model_file_changed_since_it_trained_says_so(tmp_path, capsys):
    """Its weights went into the edited code without a word (a resume of the same run refuses)."""
    model = _write(tmp_path / "m.py", GOOD)
    run = tmp_path / "run"
    assert main(["train", model, "--out", str(run), "--epochs", "2", "--no-progress"]) == 0
    onnx_path = str(tmp_path / "m.onnx")
    capsys.readouterr()
    assert main(["export", str(run / "checkpoint.safetensors"), "-o", onnx_path]) == 0
    assert "changed since" not in capsys.readouterr().err
    (tmp_path / "m.py").write_text(GOOD.replace("torch.randn(8, 3)", "torch.randn(8, 3) * 2") + "\n# edited\n")
    assert main(["export", str(run / "checkpoint.safetensors"), "-o", onnx_path]) == 0
    err = capsys.readouterr().err
    assert f"warning: {model} changed since the run in checkpoint {run / 'checkpoint.safetensors'} trained it" in err


def test_a_runs_summary_holds_its_settings_as_a_config_file_takes_them(tmp_path, capsys):
    """summary.json held mode, seed and maximize only: the lr, batch, pool, patience ... a run ran with were in
    its checkpoint's metadata alone."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", DIGITS, "--epochs", "1", "--lr", "0.003", "--pool", "3", "--batch-size", "64",
                 "--include", "fc1", "--out", str(first), "--no-progress"]) == 0
    summary = json.loads((first / "summary.json").read_text())
    assert summary["training"]["lr"] == 0.003 and summary["config"]["pool"] == 3 and summary["include"] == ["fc1"]
    (tmp_path / "settings.json").write_text(json.dumps({**summary["config"], **summary["training"]}))
    assert main(["train", DIGITS, "--config", str(tmp_path / "settings.json"), "--include", "fc1", "--out", str(second),
                 "--no-progress"]) == 0
    again = json.loads((second / "summary.json").read_text())
    assert [again[k] for k in ("config", "training", "include", "exclude")] == \
        [summary[k] for k in ("config", "training", "include", "exclude")]


def test_mode_gd_with_dendrite_phase_settings_is_warned_of(tmp_path, capsys):
    """`train --mode gd --pool 50 --candidate-lr 5` ran with no word that neither is read."""
    assert main(["train", DIGITS, "--mode", "gd", "--pool", "50", "--candidate-lr", "5", "--epochs", "1",
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert ("mode 'gd' grows random dendrites and runs no dendrite phase: pool, candidate_lr are not used (drop them, "
            "or train with mode 'pb')") in capsys.readouterr().err


def test_a_run_whose_epoch_cap_came_before_any_dendrite_round_says_why_in_its_report(tmp_path, capsys):
    """`train --epochs 5` (patience 30) trained plain, and its report gave no word that its settings let no dendrite
    in; a run whose rounds ran says nothing of it."""
    assert main(["train", DIGITS, "--epochs", "2", "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert ("note: no dendrite round ran: the epoch cap (2) came before the first neuron phase ended (it ends after "
            "patience 30 epochs without a gain above 0.001): raise --epochs, or lower --patience") \
        in capsys.readouterr().out
    assert main(["train", DIGITS, "--epochs", "3", "--neuron-epochs", "2", "--max-dendrite-epochs", "1",
                 "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "dendrite phase started" in printed and "no dendrite round ran" not in printed


NAMEDTUPLE_BATCHES = """
from collections import namedtuple

import torch
from torch import nn

from pbp_fx.models.digits_mlp import datasets as digits

Sample = namedtuple("Sample", "x y")


class Named(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return Sample(*self.data[i])


def build_model():
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def example_inputs():
    return (torch.rand(2, 64),)


def datasets(seed=0):
    return tuple(Named(d) for d in digits(seed))
"""


def test_batches_of_namedtuples_train(tmp_path):
    """Batches that are namedtuples failed on the CPU once every batch went through the device move:
    "Sample.__new__() missing 1 required positional argument: 'y'"."""
    assert main(["train", _write(tmp_path / "m.py", NAMEDTUPLE_BATCHES), "--epochs", "1", "--no-progress"]) == 0


def test_a_run_saved_before_devices_were_recorded_resumes_as_a_cpu_run(tmp_path):
    from pbp_fx.job import saved_run

    run = tmp_path / "run"
    assert main(["train", DIGITS, "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    _rewrite_job_state(str(run / "checkpoint.safetensors"),
                       lambda job: {k: v for k, v in job.items() if k not in ("device", "devices")})
    saved = saved_run(str(run))
    assert saved.device == "cpu" and saved.devices == ("cpu",)


def test_a_module_the_model_file_imports_from_its_folder_is_part_of_the_run(tmp_path, capsys):
    """Editing a neighbour the model file imports (its build_model, say) changed the model without a word: a
    resume, and compare's kept runs and --pb-run, took the run as the same."""
    from pbp_fx.job import local_imports, model_digest

    (tmp_path / "helper.py").write_text(open(DIGITS).read())
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "width.py").write_text("WIDTH = 8\n")
    model = _write(tmp_path / "m.py", "import torch\nfrom helper import build_model, example_inputs, datasets\n"
                                      "from pkg.width import WIDTH\n")
    assert local_imports(model) == sorted(str(p) for p in (tmp_path / "helper.py", tmp_path / "pkg" / "__init__.py",
                                                            tmp_path / "pkg" / "width.py"))
    # A run recorded before the imports counted is checked against the file alone: not "changed".
    from pbp_fx.job import changed_since, digest_matches

    old = {"model_digest": model_digest(model, with_imports=False), "data": "d"}
    now = {"model_digest": model_digest(model), "digest_of": "file+imports", "file_digest": old["model_digest"],
           "data": "d"}
    assert changed_since(old, now) == [] and digest_matches(old, model) and digest_matches(now, model)
    # a submodule taken from a package, and a package's relative imports, are followed too
    (tmp_path / "pkg" / "__init__.py").write_text("from .core import CORE\n")
    (tmp_path / "pkg" / "core.py").write_text("CORE = 1\n")
    (tmp_path / "pkg" / "layers.py").write_text("LAYERS = 1\n")
    (tmp_path / "other.py").write_text("from pkg import layers\n")
    assert local_imports(str(tmp_path / "other.py")) == sorted(
        str(tmp_path / "pkg" / f) for f in ("__init__.py", "core.py", "layers.py"))
    run = tmp_path / "run"
    assert main(["train", model, "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    before = model_digest(model)
    (tmp_path / "pkg" / "width.py").write_text("WIDTH = 16\n")
    assert model_digest(model) != before
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert "its model file changed since it started" in capsys.readouterr().err


def test_the_plots_point_at_best_validation_is_the_runs_own_best_epoch(tmp_path, monkeypatch):
    """A later epoch better by less than `improvement` is no new best: summary.json kept epoch 2, and the
    plot's "at best validation" point showed epoch 3's scores."""
    from matplotlib.axes import Axes

    from pbp_fx.job import plot_history
    from pbp_fx.training import History

    row = dict(phase="neuron", dendrites=0, train_loss=0.1, params=100, decision="continue", seconds=0.1)
    history = History(epochs=[dict(row, epoch=1, val=0.50, test=0.40), dict(row, epoch=2, val=0.60, test=0.55),
                              dict(row, epoch=3, val=0.6005, test=0.45)], best_epoch=2, best_val=0.60)
    drawn = []
    plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: (drawn.append((a, k.get("label"))), plot(self, *a, **k))[1])
    assert plot_history(history, str(tmp_path / "plot.png"))
    points = {label: list(a[1]) for a, label in drawn if list(a[0]) == [100]}
    assert points == {"validation": [0.60], "test": [0.55]}


def test_a_stop_signal_right_after_a_checkpoint_was_replaced_names_the_epoch_it_holds(tmp_path, monkeypatch, capsys):
    """A SIGINT landing after epoch 3's file was replaced, before the run counted it, said 'interrupted after epoch
    2' (and its resume command), while the checkpoint held epoch 3."""
    import signal

    from pbp_fx import job

    real, calls = job.save, []

    def saved_then_interrupted(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(job, "save", saved_then_interrupted)
    out = tmp_path / "run"
    assert main(["train", _write(tmp_path / "m.py", GOOD), "--out", str(out), "--epochs", "5", "--no-progress"]) == 130
    monkeypatch.setattr(job, "save", real)
    assert "interrupted after epoch 3; the run so far resumes with" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert "after epoch 3 " in capsys.readouterr().out


@pytest.mark.parametrize("own, said", [
    ("def loss_fn(o, y): return torch.nn.functional.cross_entropy(o, y) * float('nan')\n",
     "the loss is nan on the first training samples at the model's initial weights, before any training: check the "
     "model file's loss_fn"),
    ("def metric(o, y): return float('nan'), len(y)\n",
     "the metric returned (nan, 4) on the first training samples: return a finite (sum, count) pair")])
def test_a_loss_or_metric_that_is_nan_on_the_first_samples_is_refused_before_training(own, said, tmp_path, capsys):
    """Both ran a whole epoch first; the loss's message then said to lower the learning rate, which cannot help at
    the initial weights (a reviewer)."""
    out = tmp_path / "run"
    assert main(["train", _write(tmp_path / "m.py", GOOD + own), "--out", str(out), "--batch-size", "4",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pbp-fx: error: {said}") and err.count("\n") == 1, err
    assert "in epoch" not in err and not out.exists()


def test_a_run_into_a_folder_another_run_writes_now_is_refused_and_leaves_it_as_it_was(tmp_path, capsys):
    """A second train into the --out of a run still training was taken: the folder ended with the second run's
    reports beside the first's checkpoint (a reviewer)."""
    from pbp_fx.fileio import folder_held

    model, out = _write(tmp_path / "m.py", GOOD), tmp_path / "run"
    assert main(["train", model, "--out", str(out), "--epochs", "1", "--batch-size", "4", "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    with folder_held(str(out)):  # (the other run, holding it as a run does)
        assert main(["train", model, "--out", str(out), "--epochs", "2", "--batch-size", "4", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err == f"pbp-fx: error: {out} is in use: another pbp-fx run writes there now; give another folder, " \
                      "or wait for that run to end\n"
        assert main(["train", "--resume", str(out), "--no-progress"]) == 2
        assert "is in use" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["train", model, "--out", str(out), "--epochs", "2", "--batch-size", "4", "--no-progress"]) == 0


def test_a_run_records_its_cpu_threads_and_a_resume_or_pb_run_on_another_count_is_warned_of(tmp_path, capsys):
    """torch's CPU kernels sum in another order at another thread count: a resume at 2 threads of a 1-thread run
    ended with another model (2 dendrites, not 0) without a word, and compare --pb-run (controls on 1 thread) read a
    2-thread run that kept no dendrite as 'pb is 0.5 points behind plain' (a reviewer)."""
    from pbp_fx.compare import read_pb_run

    model, out = _write(tmp_path / "m.py", GOOD), tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["train", model, "--out", str(out), "--epochs", "2", "--batch-size", "4", "--no-progress"]) == 0
        with pytest.warns(pbp_fx.PBWarning, match="that run trained on 2 CPU threads and compare trains its controls "
                                                  "on 1"):
            read_pb_run(str(out))
        torch.set_num_threads(1)
        capsys.readouterr()
        assert main(["train", "--resume", str(out), "--no-progress"]) == 0
        assert ("the run trained on 2 CPU thread(s) and resumes on 1: torch's kernels sum in another order"
                in capsys.readouterr().err)
    finally:
        torch.set_num_threads(threads)


def test_compare_pb_run_warns_of_a_run_whose_data_draws_from_its_datasets_own_generator(tmp_path):
    """The run's checks read samples before training, which moved the dataset's own generator, so compare's
    controls saw other augmentation: --pb-run read a run that kept no dendrite as 1.5 points behind plain (a
    reviewer)."""
    from pbp_fx.compare import read_pb_run

    own = ("import numpy as np\n"
           "class Noisy(torch.utils.data.Dataset):\n"
           "    def __init__(self, d):\n        self.d, self.rng = d, np.random.default_rng(0)\n"
           "    def __len__(self): return len(self.d)\n"
           "    def __getitem__(self, i):\n        x, y = self.d[i]\n"
           "        return x + float(self.rng.normal()), y\n"
           "_plain = datasets\n"
           "def datasets():\n    train, val, test = _plain()\n    return Noisy(train), val, test\n")
    out = tmp_path / "run"
    assert main(["train", _write(tmp_path / "m.py", GOOD + own), "--out", str(out), "--epochs", "2", "--batch-size",
                 "4", "--no-progress"]) == 0
    with pytest.warns(pbp_fx.PBWarning, match="that run's training data draws augmentation from a generator of the "
                                              "dataset's own"):
        read_pb_run(str(out))
