"""Fine-tuning a pruned model with peft LoRA without losing its sparsity.

LoRA trains B @ A beside each frozen (sparse) base weight, so the base stays sparse while
training. Merging adds the dense B @ A into the weight, and sparsity is lost (users saw 40%
become 33%). ``merge_sparse`` merges and then re-applies the masks: the merged model has
exactly the pruned pattern, at the cost of the adapter's update on pruned positions, which
``remask_cost`` measures in perplexity.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from wandapp._optional import require
from wandapp.adapters import matrix, unwrap
from wandapp.errors import InvalidArgumentError
from wandapp.masks import apply_masks


def _require_peft_model(model: Any) -> Any:
    """The PeftModel, also inside torch.compile or DataParallel (``adapters.unwrap``)."""
    inner = unwrap(model, peft="keep")
    if not isinstance(inner, require("peft", "LoRA support").PeftModel):
        raise InvalidArgumentError(f"expected a peft PeftModel (from get_peft_model), got {type(model).__name__}")
    return inner


def merge_sparse(peft_model: Any, masks: Mapping[str, torch.Tensor]) -> Any:
    """Merges the LoRA adapters into the base weights, re-applies ``masks`` (names as in the
    base model, e.g. from ``PruneReport.masks`` or ``wandapp.load_masks``), and returns the
    merged base model. ``peft_model`` is consumed (peft's merge_and_unload)."""
    merged = _require_peft_model(peft_model).merge_and_unload()
    apply_masks(merged, masks)
    return merged


@dataclass
class RemaskCost:
    """What re-masking a merged LoRA update cost (``remask_cost``): perplexities and the update's share kept."""

    unmerged: float  # perplexity with the adapter unmerged (dense update)
    merged_sparse: float  # perplexity after merge_sparse
    update_kept: float  # share of the adapter update's squared norm on kept weights

    def __str__(self) -> str:
        return (
            f"perplexity {self.unmerged:.3f} with the adapter unmerged, {self.merged_sparse:.3f} merged and "
            f"re-masked ({self.update_kept:.1%} of the update's energy falls on kept weights)"
        )


@torch.no_grad()
def remask_cost(peft_model: Any, masks: Mapping[str, torch.Tensor], eval_ids: torch.Tensor, seqlen: int = 512) -> RemaskCost:
    """What re-masking costs: perplexity on ``eval_ids`` of the unmerged adapter vs
    ``merge_sparse`` (on a copy; ``peft_model`` is left as it is)."""
    from wandapp.eval import perplexity

    peft_model = _require_peft_model(peft_model)
    unmerged = perplexity(peft_model, eval_ids, seqlen=seqlen, progress=False).perplexity
    work = copy.deepcopy(peft_model)
    base = work.get_base_model()
    before = {n: w.detach().clone() for n in masks if (w := matrix(base, n)) is not None}
    merged = work.merge_and_unload()
    kept = total = 0.0
    for name, weight in before.items():
        after = matrix(merged, name)
        assert after is not None  # merging keeps the base model's names
        delta = (after.float() - weight.float()) ** 2
        total += delta.sum().item()
        kept += delta[masks[name].to(delta.device)].sum().item()
    apply_masks(merged, masks)
    merged_sparse = perplexity(merged, eval_ids, seqlen=seqlen, progress=False).perplexity
    return RemaskCost(unmerged, merged_sparse, kept / total if total else 1.0)
