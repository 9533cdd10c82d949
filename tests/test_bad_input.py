"""Bad models and bad case files: a clear message naming the thing, exit code 2, no traceback."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from lancet.cli import main


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output + (result.stderr if hasattr(result, "stderr") else "")


def tiny_model(opset=13, input_type=TensorProto.FLOAT, nodes=None, initializers=()):
    nodes = nodes or [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["y"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", input_type, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              initializer=list(initializers) or [numpy_helper.from_array(
                                  np.ones((4, 3), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def save(model, path):
    onnx.save(model, str(path))
    return path


def assert_clean_failure(code, output, *fragments):
    assert code == 2, output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in output, (fragment, output)


def test_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n" * 10)
    assert_clean_failure(*run_cli("inspect", path), str(path))


def test_truncated(tmp_path, backdoor_case):
    data = backdoor_case.model.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    assert_clean_failure(*run_cli("inspect", path), str(path))


def test_missing_file(tmp_path):
    assert_clean_failure(*run_cli("inspect", tmp_path / "absent.onnx"), "absent.onnx", "does not exist")


@pytest.mark.parametrize("opset", [8, 26])
def test_opset_out_of_range(tmp_path, opset):
    path = save(tiny_model(opset=13), tmp_path / f"op{opset}.onnx")
    model = onnx.load(str(path))
    model.opset_import[0].version = opset
    onnx.save(model, str(path))
    assert_clean_failure(*run_cli("inspect", path), f"opset {opset}", "9 to 25")


def test_no_float_input(tmp_path):
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT), helper.make_node("Gemm", ["xf", "w"], ["y"])]
    path = save(tiny_model(input_type=TensorProto.INT64, nodes=nodes), tmp_path / "ints.onnx")
    assert_clean_failure(*run_cli("inspect", path), "no float or 8/16-bit integer image input", "int64")


def test_missing_external_data(tmp_path):
    model = tiny_model()
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    code, output = run_cli("inspect", path, "--json")
    assert code == 0, output  # loads with its external data
    (tmp_path / "ext.onnx.data").unlink()
    assert_clean_failure(*run_cli("inspect", path), "ext.onnx.data", "missing")


def test_unsupported_ops_listed_together(tmp_path):
    nodes = [helper.make_node("LpNormalization", ["x4"], ["l"], axis=1, name="norm_a"),
             helper.make_node("LpNormalization", ["l"], ["l2"], axis=1, name="norm_b"),
             helper.make_node("Hardmax", ["l2"], ["h"], name="hard"),
             helper.make_node("Flatten", ["h"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x4", TensorProto.FLOAT, ["N", 1, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              initializer=[numpy_helper.from_array(np.ones((4, 3), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = save(model, tmp_path / "unsupported.onnx")
    assert_clean_failure(*run_cli("inspect", path), "LpNormalization", "norm_a", "norm_b", "Hardmax", "hard")


def test_real_process_exit_code(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x00\x01garbage")
    proc = subprocess.run([sys.executable, "-m", "lancet.cli", "inspect", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and str(path) in proc.stderr


def _case_with(backdoor_case, tmp_path, **changes):
    arrays = dict(np.load(backdoor_case.case))
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    path = tmp_path / "case.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("change,fragment", [
    ({"y_clean": None}, "'y_clean'"),
    ({"x_clean": np.zeros((5, 1, 27, 28), np.float32)}, "'x_clean' has shape"),
    ({"x_clean": np.zeros((5, 1, 28, 28), np.float64)}, "'x_clean' has dtype float64"),
    ({"x_clean": np.full((5, 1, 28, 28), np.nan, np.float32), "y_clean": np.zeros(5, np.int64)}, "NaN"),
    ({"y_clean": np.full(400, 12, np.int64)}, "outside the model's output range"),
    ({"x_error": np.zeros((0, 1, 28, 28), np.float32), "y_error": np.zeros(0, np.int64)}, "'x_error' is empty"),
    ({"y_error": None}, "'y_error'"),
    ({"trigger_mask": np.ones((28, 28), np.float32)}, "'trigger_mask' has shape"),
])
def test_bad_case_files(backdoor_case, tmp_path, change, fragment):
    path = _case_with(backdoor_case, tmp_path, **change)
    assert_clean_failure(*run_cli("eval", backdoor_case.model, "--data", path), fragment)


def test_pickled_case_rejected(backdoor_case, tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, x_clean=np.array([object()], dtype=object), y_clean=np.zeros(1, np.int64))
    assert_clean_failure(*run_cli("eval", backdoor_case.model, "--data", path), "pickle")


def test_node_that_cannot_run_is_named(tmp_path):
    """A graph whose node fails on its inputs' shapes (here a Gemm weight that does not fit) exits 2 with
    the node, its op and the shapes, not a traceback from inside JAX."""
    model = tiny_model(initializers=[numpy_helper.from_array(np.ones((5, 3), np.float32), "w")])
    model.graph.node[1].name = "head"
    path = save(model, tmp_path / "misfit.onnx")
    case = tmp_path / "case.npz"
    np.savez(case, x_clean=np.zeros((6, 4), np.float32), y_clean=np.zeros(6, np.int64))
    assert_clean_failure(*run_cli("eval", path, "--data", case, "--backend", "jax"),
                         "node 'head' (Gemm)", "(6, 4), (5, 3)")


def test_if_on_the_data_with_unlike_branches_is_refused(tmp_path):
    """An If whose condition depends on the input's values runs both branches and selects; branches whose
    outputs differ in shape cannot be selected between: exit 2 naming the node and both shapes."""
    then_graph = helper.make_graph([helper.make_node("Identity", ["x4"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_graph = helper.make_graph([helper.make_node("Flatten", ["x4"], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("ReduceSum", ["x4"], ["total"], keepdims=0),
             helper.make_node("Greater", ["total", "zero"], ["positive"]),
             helper.make_node("If", ["positive"], ["picked"], then_branch=then_graph, else_branch=else_graph,
                              name="sign_switch"),
             helper.make_node("Flatten", ["picked"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x4", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                              initializer=[numpy_helper.from_array(np.ones((4, 3), np.float32), "w"),
                                           numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = save(model, tmp_path / "data_if.onnx")
    case = tmp_path / "case.npz"
    np.savez(case, x_clean=np.ones((2, 1, 2, 2), np.float32), y_clean=np.zeros(2, np.int64))
    assert_clean_failure(*run_cli("eval", path, "--data", case, "--backend", "jax"), "sign_switch",
                         "differs between the branches", "(1, 1, 2, 2)", "(1, 4)")
