"""Weights shared between places (issue 22, kind 4): a weight wandapp would prune that the model
also uses elsewhere (a module or parameter used by two blocks, two parameters over one memory,
one module in two block positions) is refused before any change, naming every place; tied
embeddings and LM head, outside the blocks, keep working."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wandapp

from conftest import calib_ids, tiny_model

IDS = calib_ids(n=4, seqlen=16, seed=51)
RUN = dict(sparsity=0.5, method="wanda++", nsamples=4, ro_samples=2, ro_holdout=1, ro_rounds=1, progress=False)


def share_module(model):
    model.model.layers[2].mlp = model.model.layers[0].mlp


def share_parameter(model):
    model.model.layers[1].self_attn.q_proj.weight = model.model.layers[0].self_attn.q_proj.weight


def share_memory(model):  # two Parameter objects over one storage
    model.model.layers[1].mlp.up_proj.weight = nn.Parameter(model.model.layers[0].mlp.up_proj.weight.data)


def share_within_a_block(model):
    model.model.layers[0].mlp.gate_proj.weight = model.model.layers[0].mlp.up_proj.weight


def share_half_of_a_matrix(model):  # an overlapping view, bfloat16
    big = model.model.layers[0].mlp.down_proj.weight
    model.model.layers[1].mlp.down_proj.weight = nn.Parameter(big.data[:, :])


SHARINGS = {
    "module": (share_module, ["model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]),
    "parameter": (share_parameter, ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]),
    "memory": (share_memory, ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]),
    "within a block": (share_within_a_block, ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"]),
    "view": (share_half_of_a_matrix, ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]),
}


@pytest.mark.parametrize("method", ["wanda++", "sparsegpt"])
@pytest.mark.parametrize("kind", SHARINGS)
def test_a_shared_weight_is_refused_naming_every_place(kind, method):
    model = tiny_model("llama", seed=52, num_hidden_layers=3, dtype=torch.bfloat16 if kind == "view" else torch.float32)
    share, places = SHARINGS[kind]
    share(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(wandapp.UnsupportedModelError, match="shared by several places") as err:
        wandapp.prune(model, IDS, **{**RUN, "method": method})
    for place in places:
        assert place in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_one_block_in_two_positions_is_named():
    model = tiny_model("llama", seed=53, num_hidden_layers=3)
    model.model.layers[2] = model.model.layers[0]
    with pytest.raises(wandapp.UnsupportedModelError, match="decoder blocks 0 and 2 are one module object"):
        wandapp.prune(model, IDS, **RUN)


def test_leaving_every_place_out_prunes_the_rest_and_leaves_the_shared_weight_alone():
    model = tiny_model("llama", seed=54, num_hidden_layers=3)
    share_parameter(model)
    shared = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    report = wandapp.prune(model, IDS, ignore=["self_attn.q_proj"], **RUN)
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, shared)
    assert report.pruned_blocks == [0, 1, 2]


def test_tied_embeddings_keep_working():
    model = tiny_model("llama", seed=55, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embeddings = model.lm_head.weight.detach().clone()
    wandapp.prune(model, IDS, **RUN)
    assert model.lm_head.weight is model.model.embed_tokens.weight and torch.equal(model.lm_head.weight, embeddings)
