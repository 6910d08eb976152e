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


#: Linear layers of a mixture-of-experts block that route tokens (never pruned).
ROUTERS = ("mlp.gate", "mlp.router", "mlp.shared_expert_gate")


def block_linears(layer) -> list[tuple[str, torch.nn.Linear]]:
    return [(n, m) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and n not in ROUTERS]


def block_experts(layer):
    """(name, module) of transformers 5's fused experts modules in a block."""
    return [(n, m) for n, m in layer.named_modules() if type(m).__name__.endswith("Experts") and hasattr(m, "gate_up_proj")]


def expert_matrix(experts, param: str, e: int) -> torch.Tensor:
    w = getattr(experts, param)[e]
    return w.t() if getattr(experts, "is_transposed", False) else w


def routed_expert_inputs(experts, hidden: torch.Tensor, top_k_index: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
    """Each expert's gate_up and down_proj inputs from the tokens routed to it, recomputed from
    the experts' weights with transformers' own gate function."""
    out = {}
    for e in range(experts.num_experts):
        rows = hidden[(top_k_index == e).any(dim=-1)]
        gate_up = rows @ expert_matrix(experts, "gate_up_proj", e).t()
        if getattr(experts, "has_bias", False):
            gate_up = gate_up + experts.gate_up_proj_bias[e]
        out[("gate_up_proj", e)] = rows
        out[("down_proj", e)] = experts._apply_gate(gate_up)
    return out


def forward_all(model, sequences: list[torch.Tensor], hooks: list) -> None:
    """Runs every sequence through the whole model without gradients, then removes ``hooks``."""
    try:
        with torch.no_grad():
            for ids in sequences:
                model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()


def wanda_model(model, sequences: list[torch.Tensor], sparsity: float | str, pruned: dict[str, int] | None = None) -> dict:
    """Wanda on any decoder (dense or mixture of experts), block by block, every block's inputs
    recomputed with a full model forward. Experts are scored from their routed tokens; one that
    received none by magnitude. ``pruned`` ({linear name: weights per row}) overrides the
    sparsity of the linear layers it names. Returns {name: keep-mask}."""
    masks = {}
    for index, layer in enumerate(model.model.layers):
        captured = _captured_inputs(model, index, sequences)
        sums = _input_square_sums(layer, captured)

        def score(name, key, w):
            return w.float().abs() * torch.sqrt(sums[key] / len(captured)).float()[None, :] if key in sums else w.float().abs()

        masks.update(_select_and_apply(layer, f"model.layers.{index}", score, sparsity, pruned))
    return masks


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


def drop_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask dropping each row's k lowest scores (ties: the lower column first)."""
    order = torch.sort(scores.float() + 0.0, dim=1, stable=True).indices
    keep = torch.ones_like(scores, dtype=torch.bool)
    for row in range(scores.shape[0]):
        keep[row, order[row, :k]] = False
    return keep


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | str, blocksize: int = 128, percdamp: float = 0.01):
    """IST-DASLab/sparsegpt ``SparseGPT.fasterprune``, transcribed, with the unstructured mask
    chosen per row (each row of a column block drops floor(end x s) - floor(start x s)) instead
    of one threshold per block, and the weights of inputs that never fire (zero diagonal of H)
    left as they are instead of zeroed before the sweep (the reference's ``W[:, dead] = 0`` pruned
    them beyond the mask; the sweep never updates them). Returns (pruned weight, keep-mask); does
    not change its inputs."""
    W = weight.clone().to(hessian.dtype)
    H = hessian.clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(H))
    H[range(cols), range(cols)] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    nm = None if not isinstance(sparsity, str) else tuple(int(v) for v in sparsity.split(":"))
    if nm is not None:
        blocksize = max(1, blocksize // nm[1]) * nm[1]
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if nm is None:
            k = pruned_per_row(i2, sparsity) - pruned_per_row(i1, sparsity)
            mask1 = drop_lowest(W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2, k)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                tmp = W1[:, i : i + nm[1]] ** 2 / (torch.diag(Hinv1)[i : i + nm[1]].reshape((1, -1))) ** 2
                mask1[:, i : i + nm[1]] = nm_mask(tmp, *nm)
            q = w.clone()
            q[~mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        keep[:, i1:i2] = mask1
    return W, keep


def _input_hooks(layer, add) -> list:
    """Hooks that call ``add(key, x)`` with each matrix's input in ``layer``'s forwards: a linear
    layer's (key: its name), and each expert's routed tokens (key: (module, param, e); none for an
    expert that no token reached)."""
    hooks = [l.register_forward_pre_hook(lambda m, a, n=n: add(n, a[0])) for n, l in block_linears(layer)]
    for n, ex in block_experts(layer):
        def on_experts(m, a, n=n, ex=ex):
            for (param, e), x in routed_expert_inputs(ex, a[0], a[1]).items():
                if x.shape[0]:
                    add((n, param, e), x)
        hooks.append(ex.register_forward_pre_hook(on_experts))
    return hooks


def _run_block(layer, captured, hooks: list) -> None:
    """Runs ``layer`` on every captured input without gradients, then removes ``hooks``."""
    try:
        with torch.no_grad():
            for x, kw in captured:
                layer(x, **kw)
    finally:
        for h in hooks:
            h.remove()


def _block_output(layer, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _captured_inputs(model, index: int, sequences: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict]]:
    """Block ``index``'s input and arguments for every sequence, from a full model forward (so the
    earlier blocks, pruned as they are now, produce them)."""
    captured = []
    layer = model.model.layers[index]
    hook = layer.register_forward_pre_hook(lambda m, a, k: captured.append((a[0].detach(), dict(k))), with_kwargs=True)
    forward_all(model, sequences, [hook])
    return captured


def _block_matrices(layer, prefix: str) -> dict:
    """{mask name: (key, 2-D weight view)} of every matrix wandapp prunes in ``layer``: the linear
    layers (key: their name) and each expert's slice of a fused parameter (key: (module, param, e))."""
    out = {f"{prefix}.{n}": (n, l.weight) for n, l in block_linears(layer)}
    for n, ex in block_experts(layer):
        for param in ("gate_up_proj", "down_proj"):
            for e in range(ex.num_experts):
                out[f"{prefix}.{n}.{param}[{e}]"] = ((n, param, e), expert_matrix(ex, param, e))
    return out


def _block_parameters(layer) -> list[torch.nn.Parameter]:
    """The parameters holding those matrices: linear weights and whole fused expert tensors."""
    params = [l.weight for _, l in block_linears(layer)]
    for _, ex in block_experts(layer):
        params += [ex.gate_up_proj, ex.down_proj]
    return params


def _full_masks(layer, prefix: str, masks: dict) -> list[torch.Tensor]:
    """The keep-masks of ``_block_parameters``, fused expert tensors assembled from their slices."""
    full = [masks[f"{prefix}.{n}"] for n, _ in block_linears(layer)]
    for n, ex in block_experts(layer):
        for param in ("gate_up_proj", "down_proj"):
            slices = [masks[f"{prefix}.{n}.{param}[{e}]"] for e in range(ex.num_experts)]
            full.append(torch.stack([s.t() if getattr(ex, "is_transposed", False) else s for s in slices]))
    return full


def _input_square_sums(layer, captured: list[tuple[torch.Tensor, dict]]) -> dict:
    """Per matrix key: each input feature's sum of squares over every token (float64), from the
    block as it is now; experts from the tokens routed to them (absent: no token)."""
    sums: dict = {}

    def add(key, x):
        x = x.double().reshape(-1, x.shape[-1])
        sums[key] = sums.get(key, 0) + (x**2).sum(dim=0)

    _run_block(layer, captured, _input_hooks(layer, add))
    return sums


def _mean_block_mse(layer, captured, targets) -> float:
    """Mean over sequences of each sequence's mean squared error against the dense output."""
    with torch.no_grad():
        errors = [((_block_output(layer, x, kw).float() - t) ** 2).mean() for (x, kw), t in zip(captured, targets)]
    return float(torch.stack(errors).double().mean())


def _regional_gradient_rms(layer, prefix: str, captured) -> dict:
    """SPEC step 2: per matrix, the RMS over sequences of d ||f(X_n)||_2 / dW (one backward each)."""
    params = _block_parameters(layer)
    matrices = _block_matrices(layer, prefix)
    squares = {name: 0 for name in matrices}
    for x, kw in captured:
        grads = torch.autograd.grad(_block_output(layer, x, kw).float().square().sum().sqrt(), params, allow_unused=True)
        by_param = {id(p): (g if g is not None else torch.zeros_like(p)) for p, g in zip(params, grads)}
        for name, (key, _) in matrices.items():
            if isinstance(key, tuple):
                ex = layer.get_submodule(key[0])
                g = by_param[id(getattr(ex, key[1]))][key[2]]
                g = g.t() if getattr(ex, "is_transposed", False) else g
            else:
                g = by_param[id(layer.get_submodule(key).weight)]
            squares[name] = squares[name] + g.double() ** 2
    return {name: torch.sqrt(s / len(captured)).float() for name, s in squares.items()}


def _select_and_apply(layer, prefix: str, score, sparsity, pruned: dict[str, int] | None = None) -> dict:
    """SPEC step 4 on every matrix of ``layer`` with ``score(name, key, weight)``: each row's (or N:M
    group's) lowest scores dropped (``pruned``: {name: weights per row} for the matrices it names),
    the weights zeroed there. Returns {name: keep-mask}."""
    masks = {}
    with torch.no_grad():
        for name, (key, w) in _block_matrices(layer, prefix).items():
            s = score(name, key, w)
            masks[name] = drop_lowest(s, pruned[name]) if pruned and name in pruned else select(s, sparsity)
            w.mul_(masks[name])
    return masks


def _rgs_prune(layer, prefix: str, grad_rms: dict, sums: dict, count: int, sparsity, alpha: float) -> dict:
    """SPEC step 3 on the weights as they are: (alpha G + ||X||) |W|, |W| where no token arrived."""

    def score(name, key, w):
        if key not in sums:
            return w.float().abs()
        return (grad_rms[name] * alpha + torch.sqrt(sums[key] / count).float()[None, :]) * w.float().abs()

    return _select_and_apply(layer, prefix, score, sparsity)


def _sparsegpt_prune(layer, prefix: str, captured, sparsity) -> dict:
    """SparseGPT on every matrix: H = 2/N sum of each sequence's X^T X (float32, summed in
    float64), experts from their routed tokens (magnitude when none arrived)."""
    hessians: dict = {}

    def add(key, x):
        rows = x.reshape(-1, x.shape[-1]).float()
        hessians[key] = hessians.get(key, 0) + (rows.T @ rows).double()

    _run_block(layer, captured, _input_hooks(layer, add))
    masks = {}
    with torch.no_grad():
        for name, (key, w) in _block_matrices(layer, prefix).items():
            if key in hessians:
                pruned, masks[name] = sparsegpt(w, (2 / len(captured) * hessians[key]).float(), sparsity)
                w.copy_(pruned)
            else:
                masks[name] = select(w.float().abs(), sparsity)
                w.mul_(masks[name])
    return masks


def _training_output(layer, x: torch.Tensor, kwargs: dict, autocast: torch.dtype | None) -> torch.Tensor:
    """The block output of a training step, each sequence's forward in its own ``torch.autocast``
    region to ``autocast`` when set (so each gets its own weight cast and hands the float32
    weights a float32 gradient)."""
    if autocast is None:
        return _block_output(layer, x, kwargs)
    with torch.autocast(x.device.type, dtype=autocast):
        return _block_output(layer, x, kwargs)


def _ro_round(layer, prefix: str, captured, targets, masks: dict, lr: float, autocast: torch.dtype | None = None) -> tuple[bool, float]:
    """One regional optimization round of one step over every sequence (SPEC step 5): the mean of
    the sequences' output MSEs against the dense block (the forwards under ``torch.autocast`` to
    ``autocast`` when set), one ``torch.optim.RMSprop`` step (its defaults, which the paper uses)
    on the block's weight matrices, pruned weights set back to 0; undone when the error over the
    same sequences (the guard's held-out set, measured in float32) got worse or is not finite.
    Returns whether it was undone, and the error before it."""
    params = _block_parameters(layer)
    keep = _full_masks(layer, prefix, masks)
    before = _mean_block_mse(layer, captured, targets)
    snapshot = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.RMSprop(params, lr=lr)
    optimizer.zero_grad()
    loss = sum(((_training_output(layer, x, kw, autocast).float() - t) ** 2).mean() for (x, kw), t in zip(captured, targets)) / len(captured)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        for p, k in zip(params, keep):
            p.mul_(k)
            p.grad = None
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)
    after = _mean_block_mse(layer, captured, targets)
    undone = not (after <= before)  # NaN included
    if undone:
        with torch.no_grad():
            for p, s in zip(params, snapshot):
                p.copy_(s)
    return undone, before


def regional_schedule_model(
    model, sequences: list[torch.Tensor], method: str, sparsity, *, lr: float, alpha: float = 100.0, autocast: torch.dtype | None = None
) -> tuple[dict, list[dict]]:
    """wanda++ or sparsegpt+ro, block by block, at the settings where the schedule is order-free:
    one RO round, no step search, one RMSprop step over every calibration sequence, which also
    guard it (``ro_rounds=1, ro_samples=ro_batch_size=N, ro_holdout=0, ro_lr_search=False``).
    wanda++ (SPEC step 6): G once on the dense block, an RGS prune, the RO round, the final RGS
    prune with the input norms of the block as RO left it. sparsegpt+ro: SparseGPT, then the RO
    round with its masks. ``autocast``: the dtype of RO's training forwards (``ro_autocast``).
    Every block's inputs come from a full model forward. Returns ({name: keep-mask}, per block
    {"undone": the round was undone, "mse_before_ro": the error after the first prune,
    "mse_final": after the final one})."""
    masks, blocks = {}, []
    for index, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{index}"
        captured = _captured_inputs(model, index, sequences)
        with torch.no_grad():
            targets = [_block_output(layer, x, kw).float() for x, kw in captured]
        if method == "wanda++":
            grad_rms = _regional_gradient_rms(layer, prefix, captured)
            first = _rgs_prune(layer, prefix, grad_rms, _input_square_sums(layer, captured), len(captured), sparsity, alpha)
            undone, before = _ro_round(layer, prefix, captured, targets, first, lr, autocast)
            masks.update(_rgs_prune(layer, prefix, grad_rms, _input_square_sums(layer, captured), len(captured), sparsity, alpha))
        elif method == "sparsegpt+ro":
            block_masks = _sparsegpt_prune(layer, prefix, captured, sparsity)
            undone, before = _ro_round(layer, prefix, captured, targets, block_masks, lr, autocast)
            masks.update(block_masks)
        else:
            raise ValueError(method)
        blocks.append({"undone": undone, "mse_before_ro": before, "mse_final": _mean_block_mse(layer, captured, targets)})
    return masks, blocks
