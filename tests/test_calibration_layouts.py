"""Every batch layout common loaders yield either carries its attention mask into the statistics
or is refused with a CalibrationError (wandapp.data); nothing is silently dropped."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import wandapp
from wandapp.data import collect_sequences

from conftest import tiny_model

LENGTHS = (48, 30, 40, 17)  # real lengths of four right-padded sequences


def padded_batch(seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [4, 48] padded with id 0 and their attention mask [4, 48] (1 = real token)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        ids[row, :n] = torch.randint(1, 128, (n,), generator=g)
        mask[row, :n] = 1
    return ids, mask


def wanda_masks(loader) -> dict[str, torch.Tensor]:
    return wandapp.prune(tiny_model("llama"), loader, sparsity=0.5, method="wanda", progress=False).masks


def assert_same_masks(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def reference_masks():
    ids, mask = padded_batch()
    return wanda_masks([{"input_ids": ids[i : i + 2], "attention_mask": mask[i : i + 2]} for i in (0, 2)])


def layouts():
    ids, mask = padded_batch()
    from transformers import BatchEncoding

    return {
        "TensorDataset (ids, mask) lists": DataLoader(TensorDataset(ids, mask), batch_size=2),
        "tuples (ids, mask)": [(ids[i : i + 2], mask[i : i + 2]) for i in (0, 2)],
        "bool mask": [{"input_ids": ids, "attention_mask": mask.bool()}],
        "float mask": [{"input_ids": ids, "attention_mask": mask.float()}],
        "BatchEncoding": [BatchEncoding({"input_ids": ids, "attention_mask": mask})],
        "DataLoader over dicts": DataLoader([{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(4)], batch_size=3),
        "1-D rows": [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(4)],
        "numpy arrays": [{"input_ids": ids.numpy(), "attention_mask": mask.numpy()}],
        "zip of numpy rows": list(zip(ids.numpy(), mask.numpy())),
        "zip of list rows": list(zip(ids.tolist(), mask.tolist())),
        "numpy pairs": [(ids.numpy(), mask.numpy())],
        "python lists": [{"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": ids.tolist()}],
        "dict with labels and text": [{"input_ids": ids, "attention_mask": mask, "labels": ids, "text": ["..."] * 4}],
    }


@pytest.mark.parametrize("name", list(layouts()))
def test_every_layout_carries_its_mask(name, reference_masks):
    assert_same_masks(wanda_masks(layouts()[name]), reference_masks)


def test_dropping_the_mask_would_change_the_masks(reference_masks):
    """The check above can fail: the same ids without their mask give other masks."""
    ids, _ = padded_batch()
    without = wanda_masks([ids])
    assert any(not torch.equal(without[n], reference_masks[n]) for n in reference_masks)


def test_unpadded_rows_of_a_datasets_dataset_equal_the_same_rows_as_tensors():
    datasets = pytest.importorskip("datasets")
    ids, mask = padded_batch()
    rows = [ids[i, :n] for i, n in enumerate(LENGTHS)]
    ds = datasets.Dataset.from_dict({"input_ids": [r.tolist() for r in rows], "text": ["x"] * 4})
    expected = wanda_masks(rows)
    assert_same_masks(wanda_masks(ds), expected)  # rows of python lists
    assert_same_masks(wanda_masks(ds.with_format("torch")), expected)


@pytest.mark.parametrize(
    "loader,match",
    [
        (DataLoader(TensorDataset(*padded_batch(), padded_batch()[0]), batch_size=2), "3 arrays"),
        ([(padded_batch()[0], padded_batch()[0])], "other than 0 and 1"),
        ([{"input_ids": padded_batch()[0], "position_ids": torch.arange(48).expand(4, 48)}], "position_ids"),
        ([{"input_ids": padded_batch()[0], "inputs_embeds": torch.zeros(4, 48, 64)}], "inputs_embeds"),
        ([{"input_ids": padded_batch()[0], "cu_seq_lens_q": torch.tensor([0, 20, 48])}], "cu_seq_lens_q"),
        ([{"input_ids": padded_batch()[0], "attention_mask": torch.ones(4, 1, 48, 48)}], "does not match"),
        ([{"input_ids": padded_batch()[0], "attention_mask": torch.ones(4, 47)}], "does not match"),
        # DataLoader's default collate of token-id lists: one tensor per position, transposed.
        (DataLoader([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5, 6]}], batch_size=2), "list of tensors"),
        ([[[1, 2, 3], [4, 5]]], "rectangular"),
        ([{"input_ids": None}], "NoneType"),
        ([np.zeros((2, 4), dtype=np.float32)], "integer"),
    ],
)
def test_layouts_that_cannot_be_read_are_refused(loader, match):
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(wandapp.CalibrationError, match=match):
        wandapp.prune(model, loader, method="wanda", progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


def test_default_nsamples_uses_every_sequence_up_to_128():
    many = torch.randint(0, 128, (200, 4), generator=torch.Generator().manual_seed(0))
    assert len(collect_sequences(many)) == 128
    assert len(collect_sequences(many[:37])) == 37
    assert len(collect_sequences(many, 150)) == 150
    with pytest.raises(wandapp.CalibrationError, match="nsamples=None"):
        collect_sequences(many[:10], 11)
