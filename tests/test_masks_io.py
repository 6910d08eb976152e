"""Mask files (written and read by the Rust core) and re-applying masks."""

from __future__ import annotations

import json
import os

import pytest
import torch

import wandapp
from wandapp.testing import assert_masks_equal

from conftest import calib_ids, tiny_model


@pytest.fixture(scope="module")
def pruned():
    model = tiny_model("llama")
    report = wandapp.prune(model, calib_ids(), sparsity="2:4", method="wanda", nsamples=16, progress=False)
    return model, report


def test_round_trip_with_metadata(pruned, tmp_path):
    model, report = pruned
    path = tmp_path / "m.safetensors"
    wandapp.save_masks(path, report.masks, report=report, note="test")
    masks, meta = wandapp.load_masks(path, with_metadata=True)
    assert set(masks) == set(report.masks)
    for name, mask in report.masks.items():
        assert torch.equal(masks[name], mask)
    assert meta["method"] == "wanda" and meta["sparsity"] == "2:4" and meta["note"] == "test"
    assert json.loads(meta["config"])["seed"] == 0 and meta["seed"] == "0"
    assert meta["wandapp"] == wandapp.__version__ and meta["torch"] == torch.__version__ and "transformers" in meta


def test_file_is_bit_packed(pruned, tmp_path):
    _, report = pruned
    path = tmp_path / "m.safetensors"
    wandapp.save_masks(path, report.masks)
    weights = sum(m.numel() for m in report.masks.values())
    assert os.path.getsize(path) < weights / 8 + 8192  # 1 bit per weight plus the header


def test_apply_masks_restores_sparsity_and_checks_names(pruned):
    model, report = pruned
    dense = tiny_model("llama")
    wandapp.apply_masks(dense, report.masks)
    assert_masks_equal(dense, report.masks)
    with pytest.raises(wandapp.MaskMismatchError, match="model.layers.9"):
        wandapp.apply_masks(dense, {"model.layers.9.mlp.up_proj": torch.ones(2, 2, dtype=torch.bool)})
    bad = dict(report.masks)
    bad["model.layers.1.mlp.up_proj"] = torch.ones(3, 3, dtype=torch.bool)
    fresh = tiny_model("llama")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(wandapp.MaskMismatchError, match=r"up_proj.*\(3, 3\)"):
        wandapp.apply_masks(fresh, bad)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())  # nothing applied


@pytest.mark.parametrize("damage", ["truncate", "flip_data", "flip_header", "empty", "not_ours"])
def test_damaged_files_are_rejected(pruned, tmp_path, damage):
    _, report = pruned
    path = tmp_path / "m.safetensors"
    wandapp.save_masks(path, report.masks)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "flip_data":
        raw[-50] ^= 0x01
    elif damage == "flip_header":
        raw[20] ^= 0xFF
    elif damage == "empty":
        raw = bytearray()
    else:
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, str(path))
        raw = bytearray(path.read_bytes())
    path.write_bytes(bytes(raw))
    with pytest.raises(wandapp.MaskFileError):
        wandapp.load_masks(path)


def test_missing_file():
    with pytest.raises(wandapp.MaskFileError, match="No such file"):
        wandapp.load_masks("/nonexistent/masks.safetensors")


def test_a_folder_of_mask_files_loads_as_one(pruned, tmp_path):
    _, report = pruned
    masks = report.masks
    names = sorted(masks)
    folder = tmp_path / "masks"
    folder.mkdir()
    wandapp.save_masks(folder / "block-00000.safetensors", {n: masks[n] for n in names[: len(names) // 2]})
    wandapp.save_masks(folder / "block-00001.safetensors", {n: masks[n] for n in names[len(names) // 2 :]})
    loaded = wandapp.load_masks(folder)
    assert loaded.keys() == masks.keys() and all(torch.equal(loaded[n], masks[n]) for n in names)
    with pytest.raises(wandapp.MaskFileError, match="without masks files"):
        wandapp.load_masks(tmp_path)


def test_report_round_trips_through_its_dict(pruned):
    _, report = pruned
    again = wandapp.PruneReport.from_dict(json.loads(report.to_json()))
    assert again.to_dict() == report.to_dict() and str(again) == str(report)
    assert again.masks == {}  # masks are not part of the dict
