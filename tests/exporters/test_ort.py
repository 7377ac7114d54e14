"""ort_session / run: provider choice, errors, input handling."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import helper

import pbp_fx
from pbp_fx.config import ConfigError
from pbp_fx.exporters import RuntimeUnavailableError, ort_session, run
from pbp_fx.exporters.ort import OnnxLoadError, RunInputError
from pbp_fx.exporters import ort as ort_mod


@pytest.fixture(scope="module")
def add_model(tmp_path_factory):
    """y = a + b, z = a * 2 (two inputs, two outputs, dynamic batch); no export needed."""
    f = onnx.TensorProto.FLOAT
    two = helper.make_tensor("two", f, [], [2.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"]), helper.make_node("Mul", ["a", "two"], ["z"])], "g",
        [helper.make_tensor_value_info("a", f, ["batch", 3]), helper.make_tensor_value_info("b", f, ["batch", 3])],
        [helper.make_tensor_value_info("y", f, ["batch", 3]), helper.make_tensor_value_info("z", f, ["batch", 3])],
        initializer=[two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    path = tmp_path_factory.mktemp("ort") / "add.onnx"
    onnx.save(model, str(path))
    return path


def test_cpu_session(add_model, caplog):
    with caplog.at_level(logging.INFO, logger="pbp_fx.exporters.ort"):
        sess = ort_session(add_model, device="cpu", threads=1)
    assert isinstance(sess, onnxruntime.InferenceSession)
    assert sess.provider == "CPUExecutionProvider" == sess.get_providers()[0]
    assert "CPUExecutionProvider" in caplog.text


def test_auto_picks_what_is_there(add_model):
    sess = ort_session(str(add_model))
    expected = "CUDAExecutionProvider" if "CUDAExecutionProvider" in sess.get_providers() else "CPUExecutionProvider"
    assert sess.provider == expected


def test_session_from_bytes(add_model):
    sess = ort_session(add_model.read_bytes(), device="cpu")
    assert sess.provider == "CPUExecutionProvider"


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                    reason="this onnxruntime has CUDA")
def test_cuda_without_cuda_provider(add_model):
    with pytest.raises(RuntimeUnavailableError, match="onnxruntime-gpu") as info:
        ort_session(add_model, device="cuda")
    assert "\n" not in str(info.value)


class _FakeSession:
    """An InferenceSession stand-in whose CUDA provider failed to start."""

    def __init__(self, model, sess_options=None, providers=()):
        self.asked = list(providers)

    def get_providers(self):
        return ["CPUExecutionProvider"]


def test_cuda_provider_without_gpu(add_model, monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", _FakeSession)
    sess = ort_session(add_model, device="auto")
    assert sess.asked[0] == "CUDAExecutionProvider" and sess.provider == "CPUExecutionProvider"
    with pytest.raises(RuntimeUnavailableError, match="could not start CUDAExecutionProvider"):
        ort_session(add_model, device="cuda")
    assert ort_session(add_model, device="cpu").asked == ["CPUExecutionProvider"]


def test_bad_arguments(add_model, tmp_path):
    with pytest.raises(ConfigError, match="device="):
        ort_session(add_model, device="tpu")
    with pytest.raises(ConfigError, match="threads="):
        ort_session(add_model, threads=0)
    with pytest.raises(FileNotFoundError, match="export_onnx"):
        ort_session(tmp_path / "missing.onnx")
    (tmp_path / "notes.onnx").write_text("not a model")  # (onnxruntime's own InvalidProtobuf, a reviewer)
    with pytest.raises(OnnxLoadError, match=r"^ONNX Runtime cannot load .*notes.onnx: \S") as err:
        ort_session(tmp_path / "notes.onnx")
    assert "\n" not in str(err.value) and isinstance(err.value, pbp_fx.PBError)
    # (a graph onnxruntime refuses, an op it does not know: its Fail, one line too; the diff review)
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10),
              str(tmp_path / "unknown_op.onnx"))
    with pytest.raises(OnnxLoadError, match=r"^ONNX Runtime cannot load .*unknown_op.onnx: .*NoSuchOp"):
        ort_session(tmp_path / "unknown_op.onnx")


def test_run_input_forms(add_model):
    sess = ort_session(add_model, device="cpu", threads=1)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.ones((2, 3), dtype=np.float32)
    y, z = run(sess, {"a": a, "b": b})
    np.testing.assert_allclose(y, a + b)
    np.testing.assert_allclose(z, a * 2)
    for inputs in [(a, b), [a, b], (torch.from_numpy(a), b), (a.astype(np.float64), b)]:
        out = run(sess, inputs)
        assert out[0].dtype == np.float32
        np.testing.assert_allclose(out[0], a + b)
    big = np.zeros((7, 3), np.float32)
    assert run(sess, (big, big))[0].shape == (7, 3)  # dynamic batch


def test_run_bad_inputs(add_model):
    sess = ort_session(add_model, device="cpu", threads=1)
    a = np.zeros((1, 3), np.float32)
    with pytest.raises(RunInputError, match="takes 2"):
        run(sess, (a,))
    with pytest.raises(RunInputError, match="unknown input"):
        run(sess, {"a": a, "c": a})
    # What the file cannot take came back as onnxruntime's own InvalidArgument / Fail / ValueError (a reviewer)
    with pytest.raises(RunInputError, match=r"^missing input\(s\) \['b'\]: the model takes \['a', 'b'\]"):
        run(sess, {"a": a})
    with pytest.raises(RunInputError, match=r"^input 'a' has size 4 in dim 1, which the file fixes to 3 .*: pass that "
                                            r"size, or export with dynamic_axes=\{'a': \{1: NAME\}\}"):
        run(sess, (np.zeros((1, 4), np.float32), np.zeros((1, 4), np.float32)))
    with pytest.raises(RunInputError, match=r"^input 'a' has shape \[3\] but the file input 'a' has 2 dims"):
        run(sess, (np.zeros(3, np.float32), a))
    with pytest.raises(RunInputError, match=r"^inputs 'a' and 'b' disagree on axis 'batch' \(1 and 2\)"):
        run(sess, (a, np.zeros((2, 3), np.float32)))


def test_available_providers():
    assert "CPUExecutionProvider" in ort_mod.available_providers()


@pytest.mark.parametrize("dtype, op", [(onnx.TensorProto.DOUBLE, "Conv"), (onnx.TensorProto.BFLOAT16, "Sigmoid")])
def test_an_op_without_a_kernel_names_the_op_and_the_fix(tmp_path, dtype, op):
    """A float64 Conv or a bfloat16 Sigmoid: the CPU provider has no kernel; the error names the op and
    says to export in float32 (it used to blame a float64 conv whatever the op)."""
    inputs = ["x", "w"] if op == "Conv" else ["x"]
    w = [helper.make_tensor("w", dtype, [1, 1, 1, 1], [1.0])] if op == "Conv" else []
    graph = helper.make_graph([helper.make_node(op, inputs, ["y"])], "g",
                              [helper.make_tensor_value_info("x", dtype, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("y", dtype, [1, 1, 2, 2])], initializer=w)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    with pytest.raises(RuntimeUnavailableError, match=rf"no kernel .*{op}.*export a float32 graph: the model in "
                                                      r"float32 \(model.float\(\)\), and no torch.autocast") as err:
        ort_session(path, device="cpu")
    assert "\n" not in str(err.value) and "convs" not in str(err.value)


def test_fractional_floats_for_an_integer_input_are_refused(tmp_path):
    """Token ids given as floats were truncated (3.7 became 3) without a word."""
    graph = helper.make_graph([helper.make_node("Identity", ["ids"], ["y"])], "g",
                              [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.INT64, [2])])
    path = tmp_path / "ids.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    sess = ort_session(path, device="cpu")
    assert run(sess, (np.array([3.0, 4.0]),))[0].tolist() == [3, 4]
    with pytest.raises(RunInputError, match="got floats with fractions"):
        run(sess, (np.array([3.7, 4.0]),))
