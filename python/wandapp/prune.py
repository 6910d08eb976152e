"""``prune()``: validate, capture, loop over blocks, call the core, build the report."""

from __future__ import annotations

import hashlib
import json
import resource
import time
from dataclasses import dataclass
from typing import Any, Iterable, Protocol, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from wandapp import _core, owl
from wandapp.adapters import DecoderAdapter, Target, require_materialized, resolve, unwrap
from wandapp.block import BlockRunner, batching_fails, training_autocast
from wandapp.capture import Sample, capture_first_block, next_block_inputs, pinned_offload
from wandapp.config import RO_METHODS, Pattern, PruneConfig, parse_method, parse_sparsity
from wandapp.data import Sequence, collect_sequences, sequences_sha256
from wandapp.distributed import Share, World, guarded
from wandapp.errors import (
    CalibrationError,
    DeviceMismatchError,
    InvalidArgumentError,
    PruneError,
    PruneInterrupted,
    RankFailedError,
    SparsityError,
    UnsupportedModelError,
)
from wandapp.experts import eager_experts, unfused
from wandapp.offload import execution_device, execution_devices, is_dispatched, placed
from wandapp.report import BlockReport, PruneReport
from wandapp.state import preserved


def prune(
    model: nn.Module,
    calib_loader: Iterable[Any],
    *,
    sparsity: Union[float, str] = 0.5,
    method: str = "wanda++",
    config: PruneConfig | None = None,
    **overrides: Any,
) -> PruneReport:
    """Prunes every linear layer (and every expert of a mixture of experts) of every decoder
    block of ``model`` **in place**; ``targets`` / ``ignore`` narrow the set.

    Args:
        model: a loaded decoder-only causal LM (``AutoModelForCausalLM``: Llama, Mistral,
            Qwen2/3, Gemma, Phi-3, OLMo 2, Granite, Mixtral, Qwen-MoE...; README: supported
            models). Blocks and their linear layers are found from the model's structure, and a
            replay check proves before any change that blocks run alone as in the model. A model
            dispatched by accelerate (``device_map`` with CPU or disk offload) is pruned block by
            block on ``device`` and its offloaded weights written back (``wandapp.offload``).
        calib_loader: any iterable (a DataLoader, a list, a tokenized ``datasets.Dataset``)
            whose items are token ids [batch, seq] or [seq] (tensor, array or list), dicts or
            BatchEncodings with ``input_ids`` and an optional ``attention_mask``, or
            ``(input_ids,)`` / ``(input_ids, attention_mask)`` tuples (a TensorDataset). Padding
            (mask 0) never enters a statistic; any other layout is a CalibrationError. With
            ``nsamples=None`` (the default) every sequence up to 128 is used.
        sparsity: a float in [0, 1) (floor(in_features x sparsity) of every output row, the
            sparsity read as its decimal: see ``wandapp.kernels.pruned_per_row``) or "N:M" ("2:4").
        method: "magnitude", "wanda", "rgs" (regional gradients, no RO), "wanda++" (RGS + RO),
            "sparsegpt" (Frantar & Alistarh 2023: OBS sweep with weight updates, per row) or
            "sparsegpt+ro" (SparseGPT, then RO with its masks fixed).
        config: a ``PruneConfig``; keyword ``overrides`` replace its fields.

    Returns a ``PruneReport`` whose ``config`` holds the values used (``nsamples``,
    ``ro_samples`` and ``ro_batch_size`` resolved). The caller's grad mode (``no_grad``,
    ``inference_mode``) does not matter and is unchanged on return.

    Under an initialised ``torch.distributed`` process group of several ranks (torchrun), call it
    on every rank with the same model, data and settings: each rank runs its share of the
    calibration sequences, the statistics and RO's gradients are summed over the ranks, and every
    rank ends with the same weights, masks and block errors (README: several GPUs;
    ``wandapp.distributed``). A failure on one rank raises on every rank (``RankFailedError``
    on the others), each with its block restored.

    Raises, before any weight changes: SparsityError, InvalidArgumentError (bad settings,
    ``targets``/``ignore`` entries that match nothing, or weights that are inference tensors),
    CalibrationError (data), UnsupportedModelError (no decoder blocks, quantized or
    adapter-wrapped layers, weights on ``meta`` that accelerate does not offload, or a failed replay
    check: a block called alone does not reproduce the model's own forward), DeviceMismatchError, NonFiniteError
    (the dense model overflows on the calibration data: names the first block and layer; with
    ``dense_check=False`` only the replayed sequence is checked in every block up front). If a
    block fails later (or Ctrl-C), that block is restored bit for bit and ``PruneError``
    (``PruneInterrupted`` for Ctrl-C) carries the partial report and the cause: earlier blocks
    are pruned, that one and later ones untouched.

    Example::

        report = wandapp.prune(model, calib_ids, sparsity="2:4", nsamples=64)
        print(report)
    """
    # wandapp owns its autograd: the caller's no_grad or inference_mode does not reach the
    # gradient pass or RO, and its grad mode is back as it was on return.
    world = World.current()
    with torch.inference_mode(False), torch.enable_grad(), guarded(world):
        return last_check(world, prune_blocks(prepare(model, calib_loader, sparsity, method, config, overrides, world=world)))


def last_check(world: World | None, report: PruneReport) -> PruneReport:
    """``report`` once every rank has finished: a rank that failed after this one's last collective
    raises RankFailedError here, with this rank's report (every block finished), which the guard's
    own last check could not give. For ``prune_checkpoint`` the destination is then complete on
    this rank."""
    if world is not None:
        try:
            world.check()
        except RankFailedError as err:
            pruned = report.pruned_blocks
            done = f"blocks {_runs(pruned)} pruned" if pruned else "no block pruned"
            message = f"{err}, after this rank had finished every block ({done}). See err.report."
            raise RankFailedError(message, rank=err.rank, report=report) from None
    return report


@dataclass
class Job:
    """A validated pruning run: what ``prune_blocks`` needs."""

    adapter: DecoderAdapter
    sequences: list[Sequence]
    method: str
    pattern: Pattern
    cfg: PruneConfig  # nsamples, ro_samples and ro_batch_size resolved
    device: torch.device
    offload: torch.device
    world: World | None = None  # the ranks that share the calibration (wandapp.distributed)

    @property
    def share(self) -> Share:
        """The sequences this process runs."""
        return Share(self.world, len(self.sequences))


@dataclass
class Resumed:
    """Where a recorded run goes on: the inputs of its first unfinished block, OWL's plan and the
    report so far."""

    first_block: int
    samples: list[Sample]
    layers: owl.LayerSparsity | None
    report: PruneReport


class BlockSink(Protocol):
    """Where finished blocks go instead of back into the model (``wandapp.checkpoint``)."""

    def resume(self, job: Job) -> Resumed | None: ...

    def started(self, samples: list[Sample], layers: owl.LayerSparsity | None, report: PruneReport) -> None: ...

    def write_block(self, index: int, layer: nn.Module) -> None: ...

    def finished_block(self, index: int, samples: list[Sample], report: PruneReport) -> None: ...


def prepare(
    model: nn.Module,
    calib_loader: Iterable[Any],
    sparsity: Union[float, str],
    method: str,
    config: PruneConfig | None,
    overrides: dict[str, Any],
    sequences: list[Sequence] | None = None,
    world: World | None = None,
) -> Job:
    """Every check ``prune`` makes before any weight changes; the job they describe. Call it
    with grad mode on (the caller's no_grad must not reach the gradient pass). ``sequences``:
    the loader's, already collected (then ``calib_loader`` is not read). ``world``: the ranks
    that share the calibration (every rank must then call it alike)."""
    cfg = (config or PruneConfig()).replace(**overrides)
    pattern = parse_sparsity(sparsity)
    method = parse_method(method)
    # The model's own names (torch.compile, DataParallel...); a PeftModel is refused saying why.
    model = unwrap(model, peft="refuse")
    adapter = resolve(model, cfg.targets, cfg.ignore)
    _refuse_shared_weights(adapter)
    require_materialized(model)
    _require_ordinary_tensors(adapter)
    _check_pattern_fits(adapter, pattern)
    if cfg.layer_sparsity == "owl":
        owl.check(adapter, pattern, cfg)
    model_device = _single_device(model)
    device = torch.device(cfg.device) if cfg.device is not None else model_device
    offload = torch.device(cfg.offload) if cfg.offload is not None else (
        torch.device("cpu") if model_device.type == "cuda" else model_device
    )
    if sequences is None:
        sequences = collect_sequences(calib_loader, cfg.nsamples)
    cfg = cfg.replace(
        nsamples=len(sequences), ro_samples=cfg.ro_samples_for(len(sequences)), ro_batch_size=cfg.ro_batch_size or (world.size if world else 1)
    )
    if method in RO_METHODS and cfg.ro_rounds > 0 and cfg.ro_samples > len(sequences):
        raise CalibrationError(
            f"ro_samples={cfg.ro_samples} needs that many calibration sequences, but the run has {len(sequences)}; "
            f"lower ro_samples (or leave it None), or pass more data"
        )
    vocab = model.get_input_embeddings().num_embeddings
    for i, seq in enumerate(sequences):
        if int(seq.input_ids.min()) < 0 or int(seq.input_ids.max()) >= vocab:
            raise CalibrationError(f"calibration sequence {i} has token ids outside [0, {vocab}); was it tokenized for this model?")
    _check_positions(adapter, sequences)
    if world is not None:
        _check_world(world, adapter, sequences, method, pattern, cfg)
    return Job(adapter, sequences, method, pattern, cfg, device, offload, world)


def _check_world(world: World, adapter: DecoderAdapter, sequences: list[Sequence], method: str, pattern: Pattern, cfg: PruneConfig) -> None:
    """What a run spread over ``world`` needs: a sequence per rank, and the same model, data and
    settings on every rank (compared by hash: InvalidArgumentError on every rank). The model is
    compared by its blocks' structure and, for weights in memory, an exact checksum of their bits
    (offloaded weights are not read here; ``prune_checkpoint`` hashes its files)."""
    if len(sequences) < world.size:
        raise CalibrationError(f"{len(sequences)} calibration sequences for {world.size} processes; each needs at least one: pass more data")
    digest = hashlib.sha256(sequences_sha256(sequences).encode())
    # Where and how fast each rank runs may differ; what it computes may not.
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("device", "offload", "progress", "batch_size")}
    structure = [(name, tuple(p.shape), str(p.dtype)) for name, p in adapter.layers.named_parameters()]
    digest.update(json.dumps([method, str(pattern), settings, structure], sort_keys=True, default=str).encode())
    digest.update(_weights_checksum(adapter))
    world.require_same("models, calibration data or settings", digest.digest())


def prune_blocks(job: Job, run: BlockSink | None = None) -> PruneReport:
    """The block loop: capture once, then prune each block on the previous one's outputs.

    wandapp owns its autograd: call it with grad mode on. With ``run`` (prune_checkpoint), each
    finished block is handed to it (written to the checkpoint and recorded) instead of back into
    the model, and a run it recorded earlier resumes at its first unfinished block."""
    adapter, method, pattern, device = job.adapter, job.method, job.pattern, job.device
    model = adapter.model
    experts = [m for i in range(len(adapter.layers)) for m in adapter.experts_modules(i)]
    # Every module's own mode, every parameter's requires_grad and gradient, hooks and config
    # flags come back as the user left them (wandapp.state), on success, error or Ctrl-C.
    with preserved(model), eager_experts(experts):
        model.eval()
        resumed = run.resume(job) if run is not None else None
        if resumed is None:
            samples, layers, report = _capture(job)
            if run is not None:
                run.started(samples, layers, report)
        else:
            samples, layers, report = resumed.samples, resumed.layers, resumed.report
        cfg = PruneConfig.from_dict(report.config)  # batch_size resolved
        first = 0 if resumed is None else resumed.first_block
        bar = tqdm(range(first, len(adapter.layers)), desc=f"wandapp {method} {pattern}", disable=not job.cfg.progress, unit="block")
        for index in bar:
            has_targets = bool(adapter.targets(index))  # targets/ignore may leave nothing here
            if has_targets:
                samples = _prune_one_block(adapter, index, samples, method, pattern, layers, cfg, device, report, run, job.share)
                block = report.blocks[index]
                bar.set_postfix_str(f"block {index} output mse {block.mse_final:.2e}", refresh=False)
            try:
                if not has_targets:
                    report.blocks[index].status = "skipped"
                    samples = _run_unchanged(adapter, index, samples, device, cfg.batch_size, run, job.share)
                if run is not None:
                    run.finished_block(index, samples, report)
            except BaseException as err:  # the block's weights are as they were; the run did not record it
                report.blocks[index].status = "restored"
                raise _stopped(err, index, report) from err
    return report


def _runs(indices: list[int]) -> str:
    """Sorted block indices as runs: [0, 1, 2, 5, 7, 8] -> "0..2, 5, 7..8"."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1][-1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


def _stopped(err: BaseException, index: int, report: PruneReport) -> PruneError:
    """The PruneError (PruneInterrupted for Ctrl-C) for a run that stopped in block ``index``."""
    done = [i for i in report.pruned_blocks if i < index]
    if not done:
        pruned = "No block is pruned"
    else:
        pruned = f"Block {done[0]} is pruned" if len(done) == 1 else f"Blocks {_runs(done)} are pruned"
    later = "" if index == len(report.blocks) - 1 else " and every later block is untouched"
    message = f"pruning stopped in block {index} ({type(err).__name__}: {err}). {pruned}; block {index} was restored{later}. See err.report."
    if isinstance(err, RankFailedError):  # another rank failed: this one says which
        return RankFailedError(message, rank=err.rank, report=report, block=index)
    cls = PruneInterrupted if isinstance(err, KeyboardInterrupt) else PruneError
    return cls(message, report=report, block=index)


def _capture(job: Job) -> tuple[list[Sample], owl.LayerSparsity | None, PruneReport]:
    """The first block's inputs (the checked dense pass), OWL's plan, and the empty report with
    the batch size resolved."""
    adapter, cfg, device = job.adapter, job.cfg, job.device
    act_stats: dict[str, _core.ActivationStats] | None = {} if cfg.layer_sparsity == "owl" else None
    mine = [job.sequences[i] for i in job.share.indices]
    samples = capture_first_block(adapter, mine, job.offload, pinned_offload(job.offload, device), act_stats, cfg.dense_check, job.share.indices)
    if act_stats is not None and job.world is not None:  # OWL's dense statistics, over every rank's sequences
        for name in sorted(act_stats):
            act_stats[name].all_reduce(job.world.all_reduce, job.world.size)
    layers = owl.plan(adapter, act_stats, job.pattern, cfg, device) if act_stats is not None else None
    batch_size = cfg.batch_size or _auto_batch_size(adapter, samples, device)
    reason = batching_fails(adapter, samples, device) if batch_size > 1 else None
    if reason is not None and cfg.batch_size is not None:
        raise InvalidArgumentError(f"batch_size={cfg.batch_size} does not work for {type(adapter.model).__name__}: {reason}; use batch_size=1")
    batch_size = 1 if reason is not None else batch_size
    if job.world is not None:  # the smallest over the ranks: every rank runs (and a resume records) the same batches
        smallest = torch.tensor([-batch_size])
        job.world.all_reduce_max(smallest)
        batch_size = -int(smallest)
    cfg = cfg.replace(batch_size=batch_size)
    report = PruneReport(
        model=type(adapter.model).__name__,
        method=job.method,
        sparsity=str(job.pattern),
        config=cfg.to_dict(),
        nsamples=len(job.sequences),
        device=str(device),
        blocks=[BlockReport(index=i, status="untouched") for i in range(len(adapter.layers))],
    )
    if layers is not None:
        for index, ratio in layers.outlier_ratio.items():
            report.blocks[index].outlier_ratio = ratio
            report.blocks[index].target_sparsity = layers.block_sparsity[index]
    return samples, layers, report


def _prune_one_block(
    adapter: DecoderAdapter,
    index: int,
    samples: list[Sample],
    method: str,
    pattern: Pattern,
    layers: owl.LayerSparsity | None,
    cfg: PruneConfig,
    device: torch.device,
    report: PruneReport,
    run: BlockSink | None,
    share: Share,
) -> list[Sample]:
    """Prunes block ``index`` (each matrix at ``pattern``, or at OWL's count in ``layers``) or
    leaves it exactly as it was; returns the next block's inputs. The pruned block goes back
    into the model, or with ``run`` to the run's checkpoint."""
    targets = adapter.targets(index)
    counts = [layers.pruned_per_row[t.name] if layers else pattern.pruned_per_row(t.in_features) for t in targets]
    layer = adapter.layers[index]
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with placed(layer, device, adapter.model) as placement:
            snapshot = {k: v.detach().to(samples[0].hidden.device, copy=True) for k, v in layer.state_dict().items()}
            requires_grad = {p: p.requires_grad for p in layer.parameters()}
            try:
                for p in layer.parameters():
                    p.requires_grad_(False)
                autocast = training_autocast(cfg.ro_autocast, device, targets[0].weight().dtype) if method in RO_METHODS else None
                result, outputs = _run_core(adapter, index, samples, method, pattern, counts if layers else None, cfg, device, share, autocast)
                measured, extra_zeros = _measured_masks(targets, result["masks"])
                # Inside the try: a write-back that fails leaves the stored copies as they were.
                if run is None:
                    placement.write_back([(t.module, t.param_name) for t in targets])
                else:
                    run.write_block(index, layer)
            except BaseException:
                _restore(layer, snapshot)
                raise
            finally:
                _release_grads(requires_grad)
    except BaseException as err:
        report.blocks[index].status = "restored"
        raise _stopped(err, index, report) from err

    block = report.blocks[index]
    block.status = "pruned"
    block.layers = report.record_masks([t.name for t in targets], measured, counts, result["magnitude_fallback"], extra_zeros)
    block.mse_before_ro = result["mse_before_ro"]
    block.holdout_mse_final = result["holdout_mse_final"]
    block.mse_final = result["mse_final"]
    block.ro_losses = [r["loss"] for r in result["rounds"]]
    block.ro_rolled_back = [r["rolled_back"] for r in result["rounds"]]
    block.ro_lr = result["rounds"][0]["lr"] if result["rounds"] else None
    block.ro_steps = sum(r["steps"] for r in result["rounds"])
    block.ro_stop = result["ro_stop"]
    block.ro_autocast = str(autocast).removeprefix("torch.") if autocast is not None and result["rounds"] else None
    block.seconds = time.perf_counter() - start
    block.peak_memory_bytes = (
        torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return next_block_inputs(samples, outputs)


@torch.no_grad()
def _measured_masks(targets: list[Target], chosen: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """The masks the report gives (``weight != 0`` of each pruned matrix, so that masks and
    sparsity describe the weights as they are, whatever a method did) and, per matrix, how many
    weights the method kept are exactly zero (``LayerReport.extra_zeros``). A weight the method
    pruned that is not zero would be a broken mask: refused, which restores the block."""
    measured, extra = [], []
    for target, mask in zip(targets, chosen):
        nonzero = target.weight() != 0
        mask = mask.to(nonzero.device)
        revived = int((nonzero & ~mask).sum())
        if revived:
            raise RuntimeError(f"{target.name}: {revived} weights the method pruned are not zero; the block is restored")
        measured.append(nonzero)
        extra.append(int((mask & ~nonzero).sum()))
    return measured, extra


def _run_core(
    adapter: DecoderAdapter,
    index: int,
    samples: list[Sample],
    method: str,
    pattern: Pattern,
    counts: list[int] | None,
    cfg: PruneConfig,
    device: torch.device,
    share: Share,
    autocast: torch.dtype | None,
) -> tuple[dict, list[torch.Tensor]]:
    """The core's schedule on block ``index`` (already on ``device``), RO's training forwards
    under ``torch.autocast`` to ``autocast`` when set: its result and the next block's inputs."""
    targets = adapter.targets(index)
    with unfused(targets) as leaves:
        runner = BlockRunner(adapter, index, samples, device, cfg.batch_size, share, autocast)
        result = _core.prune_block_(
            runner,
            [t.weight() if t.expert is None else leaves[t.name] for t in targets],
            method=method,
            sparsity=pattern.sparsity,
            nm=pattern.nm,
            pruned_per_row=counts,
            alpha=cfg.alpha,
            ro_rounds=cfg.ro_rounds if method in RO_METHODS else 0,
            ro_samples=cfg.ro_samples,
            ro_holdout=cfg.ro_holdout,
            ro_lr=cfg.ro_lr,
            ro_lr_search=cfg.ro_lr_search,
            ro_batch_size=cfg.ro_batch_size,
            ro_min_improvement=cfg.ro_min_improvement,
            ro_extrapolate=cfg.ro_extrapolate,
            seed=cfg.seed + index,
        )
        return result, runner.finish()


def _run_unchanged(
    adapter: DecoderAdapter, index: int, samples: list[Sample], device: torch.device, batch_size: int, run: BlockSink | None, share: Share
) -> list[Sample]:
    """The next block's inputs from a block left as it is (written as it is to ``run``'s checkpoint)."""
    with placed(adapter.layers[index], device, adapter.model):
        outputs = BlockRunner(adapter, index, samples, device, batch_size, share).outputs()
        if run is not None:
            run.write_block(index, adapter.layers[index])
        return next_block_inputs(samples, outputs)


@torch.no_grad()
def _restore(layer: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    for key, value in layer.state_dict().items():
        value.copy_(snapshot[key])


def _release_grads(requires_grad: dict[nn.Parameter, bool]) -> None:
    """Gives each parameter back its requires_grad flag and drops the gradients RO left."""
    for p, flag in requires_grad.items():
        p.requires_grad_(flag)
        p.grad = None


#: Integer dtypes of the same width as each float dtype, to sum a tensor's bits exactly.
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def _weights_checksum(adapter: DecoderAdapter) -> bytes:
    """The sum of every in-memory block weight's bits read as integers: exact, so equal weights
    give equal sums on any device and thread count, and any difference almost surely shows."""
    sums = [
        p.detach().contiguous().view(_BITS[p.element_size()]).sum(dtype=torch.int64)
        for p in adapter.layers.parameters()
        if not p.is_meta and p.element_size() in _BITS
    ]
    return b"" if not sums else torch.stack([s.cpu() for s in sums]).numpy().tobytes()


def _position_tables(adapter: DecoderAdapter) -> list[tuple[str, int, int]]:
    """(name, positions it holds, offset) of every position table of fixed size beside the
    blocks (in the module that holds the block list, so a vision tower's own table is not taken
    for the text's): an ``nn.Embedding`` other than the token embeddings that is named for
    positions or holds ``max_position_embeddings`` rows beyond its offset (OPT's learned positions,
    offset 2; GPT-Neo's ``wpe``). Rotary models have none: ``max_position_embeddings`` does not
    limit them."""
    model = adapter.model
    parent = adapter.prefix.rpartition(".")[0]
    decoder = model.get_submodule(parent) if parent else model
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    longest = getattr(config, "max_position_embeddings", None)
    tokens = model.get_input_embeddings()
    inside = {id(m) for m in adapter.layers.modules()}
    tables = []
    for name, module in decoder.named_modules(prefix=parent):
        if not isinstance(module, nn.Embedding) or module is tokens or id(module) in inside:
            continue
        offset = int(getattr(module, "offset", 0) or 0)
        if "pos" in name.rsplit(".", 1)[-1].lower() or name.endswith("wpe") or module.num_embeddings - offset == longest:
            tables.append((name, module.num_embeddings - offset, offset))
    return tables


def _check_positions(adapter: DecoderAdapter, sequences: list[Sequence]) -> None:
    """Refuses calibration sequences longer than a fixed position table allows (CalibrationError,
    before any work): such a model would fail with a bare IndexError in its embedding, or read
    positions it never learned. The padded width counts (models that number padding positions
    too index the table with it), as well as the real tokens."""
    for name, limit, offset in _position_tables(adapter):
        for i, seq in enumerate(sequences):
            width = int(seq.input_ids.shape[1])
            real = width if seq.attention_mask is None else int(seq.attention_mask.sum())
            if width > limit:
                raise CalibrationError(
                    f"calibration sequence {i} is {width} tokens wide ({real} real tokens), but {type(adapter.model).__name__} "
                    f"learned positions for at most {limit} tokens (its position table {name} has {limit + offset} rows"
                    + (f", {offset} of them an offset" if offset else "")
                    + f"). Cut the calibration sequences to at most {limit} tokens, padding included (seqlen={limit})"
                )


def _memory_span(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(storage, first byte, byte after the last) a tensor's elements occupy; None on meta."""
    if t.is_meta:
        return None
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else 0
    return t.untyped_storage().data_ptr(), t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _refuse_shared_weights(adapter: DecoderAdapter) -> None:
    """Refuses, before any change, a weight wandapp would prune that the model also uses anywhere
    else: one module object in two block positions, one parameter registered in two places, or two
    parameters over the same memory (found by identity and by storage). Pruning it in one block
    would change the other place too, and a later block would prune and tune it again. Tied
    embeddings and LM head are outside the blocks and never pruned: they are not concerned."""
    prefix = adapter.prefix
    first: dict[int, int] = {}
    for index, layer in enumerate(adapter.layers):
        if id(layer) in first:
            raise UnsupportedModelError(
                f"decoder blocks {first[id(layer)]} and {index} are one module object ({prefix}.{index} is {prefix}.{first[id(layer)]}): "
                "each block would be pruned on one set of inputs and then again on the next. wandapp prunes models whose "
                f"blocks are their own modules; give each position its own copy ({prefix}[{index}] = copy.deepcopy(...))"
            )
        first[id(layer)] = index
    model = adapter.model
    places = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    by_identity: dict[int, list[str]] = {}
    by_storage: dict[int, list[tuple[str, int, int]]] = {}
    for name, tensor in places:
        by_identity.setdefault(id(tensor), []).append(name)
        span = _memory_span(tensor)
        if span is not None:
            by_storage.setdefault(span[0], []).append((name, span[1], span[2]))
    checked: set[int] = set()
    groups: list[list[str]] = []
    for target in adapter.all_targets():
        weight = getattr(target.module, target.param_name)
        if id(weight) in checked:
            continue
        checked.add(id(weight))
        shared = list(by_identity.get(id(weight), []))
        span = _memory_span(weight)
        if span is not None:
            shared += [n for n, lo, hi in by_storage.get(span[0], []) if lo < span[2] and span[1] < hi and n not in shared]
        if len(shared) > 1 and not any(set(shared) == set(g) for g in groups):
            groups.append(shared)
    if groups:
        listed = "; ".join(f"({', '.join(g)})" for g in groups[:8]) + (f"; and {len(groups) - 8} more" if len(groups) > 8 else "")
        raise UnsupportedModelError(
            f"{len(groups)} weights wandapp would prune are each shared by several places of the model (one parameter, or one "
            f"memory): {listed}. Pruning one place would change the others, and a later block would prune and tune it again. "
            "Give each place its own copy (module.weight = nn.Parameter(module.weight.detach().clone())), or leave every "
            "place that shares a weight out with ignore=[...]"
        )


def _check_pattern_fits(adapter: DecoderAdapter, pattern: Pattern) -> None:
    if pattern.nm is None:
        return
    n, m = pattern.nm
    for target in adapter.all_targets():
        if target.in_features % m:
            raise SparsityError(f"{n}:{m} needs in_features divisible by {m}, but {target.name} has {target.in_features}")


#: Tokens per forward call beyond which batching gains nothing (the matrix products are full).
MAX_BATCH_TOKENS = 16384


def _auto_batch_size(adapter: DecoderAdapter, samples: list[Sample], device: torch.device) -> int:
    """1 on CPU (no gain, and results stay bit-identical to a one-by-one run); on CUDA as many of
    the longest sequence as fit in half the free device memory, at most MAX_BATCH_TOKENS tokens
    and 64 sequences."""
    if device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    longest = max(s.hidden.shape[1] for s in samples)
    fits = int(0.5 * free) // (longest * adapter.token_bytes(longest, samples[0].hidden.dtype))
    return max(1, min(64, MAX_BATCH_TOKENS // longest, fits))


def _require_ordinary_tensors(adapter: DecoderAdapter) -> None:
    """The decoder blocks' weights and saved state must not be inference tensors (made inside
    ``torch.inference_mode()``): pruning changes them in place, restores them on failure and
    (rgs, wanda++) takes their gradients, all of which PyTorch forbids for inference tensors."""
    # state_dict(keep_vars=True): every parameter and persistent buffer, as tensors (not copies).
    made = [f"{adapter.prefix}.{name}" for name, t in adapter.layers.state_dict(keep_vars=True).items() if t.is_inference()]
    if made:
        raise InvalidArgumentError(
            f"{len(made)} weights of the decoder blocks (e.g. {made[:3]}) are inference tensors, created inside "
            "torch.inference_mode(); wandapp changes them in place and takes their gradients, which PyTorch forbids. "
            "Load the model outside inference_mode, or replace them with ordinary tensors (clone() outside "
            "inference_mode). Calling wandapp.prune inside inference_mode or no_grad is fine"
        )


def _single_device(model: nn.Module) -> torch.device:
    """The device the model computes on: its parameters' one device, or for a model dispatched by
    accelerate with CPU or disk offload the one accelerator its hooks compute on."""
    devices = {p.device for p in model.parameters() if not p.is_meta}
    if is_dispatched(model):
        accelerators = {d for d in devices | execution_devices(model) if d.type != "cpu"}
        if len(accelerators) > 1:
            raise DeviceMismatchError(
                f"the model is spread over several accelerators {sorted(map(str, accelerators))}; wandapp prunes models on "
                "one accelerator, with the rest offloaded to CPU or disk: load it with device_map='auto' and "
                "max_memory={0: ..., 'cpu': ...} (one GPU), or on one device"
            )
        return execution_device(model)
    if len(devices) != 1:
        raise DeviceMismatchError(
            f"the model's parameters are on several devices {sorted(map(str, devices))}; "
            "load it on one device (no device_map sharding) and set PruneConfig.device for where blocks run"
        )
    return devices.pop()
