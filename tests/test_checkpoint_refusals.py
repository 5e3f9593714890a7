"""Accurate refusals: a file that is not a checkpoint is named for what it is; one that carries code names the
global it would call and never repeats advice to turn weights_only off."""

import os
import pickle

import pytest
import torch

from distill.utils.checkpoint import safe_torch_load
from distill.utils.errors import CheckpointError, UnsafeFileError


class Runs:  # pickles as a call of os.system
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("make, what", [
    (lambda p: p.write_bytes(b""), "not a PyTorch checkpoint: an empty file"),
    (lambda p: p.write_text("epoch,loss\n1,0.5\n"), "not a PyTorch checkpoint: a text file"),
    (lambda p: p.write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x032.0" + bytes(40)),
     "not a PyTorch checkpoint: looks like ONNX; for an ONNX teacher use teacher.onnx"),
])
def test_a_file_that_is_not_a_checkpoint_is_named_for_what_it_is(tmp_path, make, what):
    path = tmp_path / "backbone.pth"
    make(path)
    with pytest.raises(CheckpointError, match=f"backbone.pth: {what}") as caught:
        safe_torch_load(path)
    assert "could run code" not in str(caught.value)


def test_a_real_onnx_file_is_recognised(tmp_path):
    import onnx  # the onnx extra, installed with the tests
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    onnx.save(model, tmp_path / "w600k_r50.onnx")
    with pytest.raises(CheckpointError, match="looks like ONNX"):
        safe_torch_load(tmp_path / "w600k_r50.onnx")


@pytest.mark.parametrize("fmt", ["torch.save", "raw pickle"])
def test_a_checkpoint_carrying_code_names_the_global_and_never_suggests_weights_only_false(tmp_path, fmt, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    if fmt == "torch.save":
        torch.save({"state_dict": {}, "x": Runs()}, path)
    else:
        path.write_bytes(pickle.dumps({"x": Runs()}, protocol=4))
    with pytest.raises(UnsafeFileError, match=r"evil.pth: refused to load: it names posix.system, which could run "
                                              r"code") as caught:
        safe_torch_load(path)
    assert "weights_only" not in str(caught.value) and not (tmp_path / "PWNED").exists()


def test_a_truncated_checkpoint_is_unreadable_not_unsafe(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="last.pt: not a readable PyTorch checkpoint"):
        safe_torch_load(path)
