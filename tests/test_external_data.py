"""Models whose tensors live in an external-data file (what torch.onnx.export's default exporter writes beside
every model): read with it, repaired into the same layout, written atomically, the input's files untouched."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import pytest

from lancet.errors import BadInputError
from lancet.io import write_model_atomic
from lancet.loader import external_data_files
from lancet.repair import repair

from .conftest import assert_backdoor_removed


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def save_external(source, path, location: str):
    onnx.save_model(onnx.load(str(source)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


def test_repair_keeps_the_external_data_layout(backdoor_case, tmp_path):
    """The test LeNet-5 with every tensor in `model.onnx.data`: the repaired file comes as `fixed.onnx` and
    `fixed.onnx.data` (tensors of 1 KiB or more outside), runs in onnxruntime from its path with the backdoor
    gone on held-out data; the input's two files are unchanged and nothing else is left in the folder."""
    source = save_external(backdoor_case.model, tmp_path / "model.onnx", "model.onnx.data")
    before = {path.name: digest(path) for path in (source, tmp_path / "model.onnx.data")}
    assert external_data_files(source) == [tmp_path / "model.onnx.data"]
    out = tmp_path / "fixed.onnx"
    result = repair(source, backdoor_case.case, out, method="flip", progress=False)
    assert result.written, result.reasons
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx", "fixed.onnx.data", "model.onnx",
                                                         "model.onnx.data"]
    assert result.to_json()["files_written"] == [str(out), str(tmp_path / "fixed.onnx.data")]
    assert external_data_files(out) == [tmp_path / "fixed.onnx.data"]
    assert out.stat().st_size < (tmp_path / "fixed.onnx.data").stat().st_size
    assert {path.name: digest(tmp_path / path.name) for path in map(tmp_path.joinpath, before)} == before
    assert_backdoor_removed(dict(np.load(backdoor_case.heldout)), source, out)


def test_repair_refuses_to_overwrite_the_inputs_external_data(backdoor_case, tmp_path):
    """An output whose data file would be the input's (`weights.onnx` beside an input keeping its tensors in
    `weights.onnx.data`) is refused before anything runs, naming it."""
    source = save_external(backdoor_case.model, tmp_path / "model.onnx", "weights.onnx.data")
    kept = digest(tmp_path / "weights.onnx.data")
    with pytest.raises(BadInputError, match="weights.onnx.data"):
        repair(source, backdoor_case.case, tmp_path / "weights.onnx", progress=False)
    assert digest(tmp_path / "weights.onnx.data") == kept


def test_failed_write_leaves_no_file(backdoor_case, tmp_path, monkeypatch):
    """When the model's rename fails, the data file renamed before it is removed and the staging folder too:
    neither name holds a file afterwards."""
    proto = onnx.load(str(backdoor_case.model))
    real_replace = os.replace

    def failing(source, target):
        if str(target).endswith(".onnx"):
            raise OSError("disk full")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        write_model_atomic(tmp_path / "out.onnx", proto, external=True)
    assert list(tmp_path.iterdir()) == []


def test_inspect_lists_the_external_data(backdoor_case, tmp_path):
    """`lancet inspect` names the external-data file and its size (JSON and table); inline: none."""
    import json

    from click.testing import CliRunner

    from lancet.cli import main

    source = save_external(backdoor_case.model, tmp_path / "model.onnx", "model.onnx.data")
    run = CliRunner().invoke(main, ["inspect", str(source), "--json"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.output)["external_data"] == [
        {"file": str(tmp_path / "model.onnx.data"), "bytes": (tmp_path / "model.onnx.data").stat().st_size}]
    assert "model.onnx.data (" in CliRunner().invoke(main, ["inspect", str(source)]).output
    inline = CliRunner().invoke(main, ["inspect", str(backdoor_case.model), "--json"])
    assert json.loads(inline.output)["external_data"] == []
