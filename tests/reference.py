"""Slow, obvious pure-PyTorch versions of what wandapp computes, written from SPEC.md, to test
against. Ties follow wandapp's documented rule: at equal score the lower column is smaller."""

from __future__ import annotations

from fractions import Fraction

import torch

LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


def pruned_per_row(in_features: int, sparsity: float) -> int:
    """floor(in_features x sparsity) in exact rational arithmetic on the decimal the user wrote
    (``repr`` gives back the shortest decimal of a float: 0.58, not 0.57999...)."""
    return int(in_features * Fraction(repr(float(sparsity))))


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    s = scores.float() + 0.0
    k = pruned_per_row(s.shape[1], sparsity)
    order = torch.sort(s, dim=1, stable=True).indices
    keep = torch.ones_like(s, dtype=torch.bool)
    for row in range(s.shape[0]):
        keep[row, order[row, :k]] = False
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    s = scores.float() + 0.0
    keep = torch.zeros_like(s, dtype=torch.bool)
    for row in range(s.shape[0]):
        for start in range(0, s.shape[1], m):
            order = torch.sort(s[row, start : start + m], stable=True).indices
            keep[row, start + order[m - n :]] = True
    return keep


def act_norm(xs: list[torch.Tensor], masks: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """SPEC: sqrt of the mean over sequences of each sequence's sum of squares (float64)."""
    total, count = 0.0, 0
    for i, x in enumerate(xs):
        for b in range(x.shape[0]):
            seq = x[b].double()
            if masks is not None and masks[i] is not None:
                seq = seq[masks[i][b]]
            total = total + (seq**2).sum(dim=0)
            count += 1
    return torch.sqrt(total / count)


def select(scores: torch.Tensor, sparsity: float | str) -> torch.Tensor:
    if isinstance(sparsity, str):
        n, m = (int(v) for v in sparsity.split(":"))
        return nm_mask(scores, n, m)
    return unstructured_mask(scores, sparsity)


def prune_model(model, sequences: list[torch.Tensor], method: str, sparsity: float | str, alpha: float = 100.0) -> dict:
    """Wanda or RGS (no RO), block by block, recomputing every block's inputs with a full model
    forward (so earlier pruned blocks feed later ones). Returns {name: keep-mask}."""
    masks = {}
    for index, layer in enumerate(model.model.layers):
        captured = []
        hook = layer.register_forward_pre_hook(lambda m, a, k: captured.append((a[0].detach(), dict(k))), with_kwargs=True)
        with torch.no_grad():
            for ids in sequences:
                model(input_ids=ids, use_cache=False)
        hook.remove()

        linears = [layer.get_submodule(n) for n in LINEARS]
        inputs: list[list[torch.Tensor]] = [[] for _ in linears]
        hooks = [l.register_forward_pre_hook(lambda m, a, k=k: inputs[k].append(a[0].detach())) for k, l in enumerate(linears)]
        with torch.no_grad():
            for x, kw in captured:
                layer(x, **kw)
        for h in hooks:
            h.remove()
        norms = [act_norm(xs).float() for xs in inputs]

        if method == "rgs":
            sq = [torch.zeros_like(l.weight, dtype=torch.float32) for l in linears]
            for l in linears:
                l.weight.requires_grad_(True)
            for x, kw in captured:
                for l in linears:
                    l.weight.grad = None
                out = layer(x, **kw)
                out = out[0] if isinstance(out, tuple) else out
                torch.square(out.float()).sum().sqrt().backward()
                for k, l in enumerate(linears):
                    sq[k] += torch.square(l.weight.grad.float())
            grad_rms = [torch.sqrt(s / len(captured)) for s in sq]
            for l in linears:
                l.weight.grad = None

        with torch.no_grad():
            for k, (name, l) in enumerate(zip(LINEARS, linears)):
                if method == "wanda":
                    score = l.weight.float().abs() * norms[k][None, :]
                else:
                    score = (grad_rms[k] * alpha + norms[k][None, :]) * l.weight.float().abs()
                keep = select(score, sparsity)
                l.weight.mul_(keep)
                masks[f"model.layers.{index}.{name}"] = keep
    return masks
