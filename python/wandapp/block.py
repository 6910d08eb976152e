"""Running one decoder block for the core: ``BlockRunner``, the Python side of the core's ``Block``
trait (batches of calibration sequences given by index), and the check that a model's blocks
accept batches."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
from torch import nn

from wandapp.adapters import DecoderAdapter
from wandapp.capture import Sample, move, pinned_offload, stash, without_padding
from wandapp.distributed import Share
from wandapp.errors import UnsupportedModelError
from wandapp.experts import routed_inputs
from wandapp.offload import placed


def _expand_batch(value: Any, size: int) -> Any:
    """Arguments captured for one sequence, for a batch of ``size`` sequences that share them
    (same length, no padding): tensors of rank 2 or more with a leading batch dimension of 1
    (position ids, position embeddings, attention masks) are expanded, without a copy; 1-D ones
    (cache positions) have no batch dimension and stay."""
    if isinstance(value, torch.Tensor):
        return value.expand(size, *value.shape[1:]) if value.dim() >= 2 and value.shape[0] == 1 else value
    if isinstance(value, (tuple, list)):
        return type(value)(_expand_batch(v, size) for v in value)
    if isinstance(value, dict):
        return {k: _expand_batch(v, size) for k, v in value.items()}
    return value


def _no_experts(target: Any) -> torch.Tensor:
    raise AssertionError(f"{target} is an expert slice, but the block has none")


def _per_token(x: torch.Tensor, shape: tuple[int, int], name: str) -> torch.Tensor:
    """A linear layer's input as [b, seq, in]: some blocks flatten tokens to [b * seq, in]
    before a layer (Qwen2-MoE's shared expert); the token mask needs them per sequence."""
    if x.numel() != shape[0] * shape[1] * x.shape[-1]:
        raise UnsupportedModelError(f"{name} received an input of shape {tuple(x.shape)}, not one row per token of the {shape} batch")
    return x.reshape(*shape, x.shape[-1])


@torch.no_grad()
def batching_fails(adapter: DecoderAdapter, samples: list[Sample], device: torch.device) -> str | None:
    """Why batches of sequences cannot share arguments for this model, or None when they can: the
    first block of each attention type runs one unpadded sequence alone and twice in a batch of
    two (arguments expanded as ``BlockRunner`` does); both rows must equal the single output. A
    model that passes per-batch arguments of another layout (Bloom's ALiBi bias, [batch x heads,
    1, seq]) fails here, before any weight changes."""
    sample = next((s for s in samples if s.token_mask is None), None)
    if sample is None:
        return None  # padded sequences always run alone
    for kind, index in adapter.first_of_each_kind().items():
        layer = adapter.layers[index]
        kwargs = move(sample.kwargs[kind], device)
        hidden = sample.hidden.to(device)
        with placed(layer, device, adapter.model):
            try:
                alone = DecoderAdapter.call(layer, hidden, kwargs)
                pair = DecoderAdapter.call(layer, torch.cat([hidden, hidden]), _expand_batch(kwargs, 2))
            except Exception as err:  # the layer refuses the expanded arguments
                return f"block {index} fails on a batch of two ({type(err).__name__}: {err})"
        if not (torch.allclose(pair[0:1], alone, rtol=1e-3, atol=1e-5) and torch.allclose(pair[1:2], alone, rtol=1e-3, atol=1e-5)):
            return f"block {index} computes something else on a batch of two identical sequences"
    return None


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CUDA GPU with bfloat16
    support (compute capability 8.0 or later), or a CPU with AVX512-BF16 or AMX (on other CPUs
    oneDNN emulates bfloat16, slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def training_autocast(setting: str, device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype RO's training forwards run in under ``torch.autocast`` for
    ``PruneConfig.ro_autocast`` = ``setting`` on ``device``, for weights of ``dtype``; None: no
    autocast (the weights' own dtype). Only float32 weights are autocast."""
    if dtype != torch.float32 or setting == "off" or (setting == "auto" and not native_bfloat16(device)):
        return None
    return torch.bfloat16


class BlockRunner:
    """The ``Block`` the core drives: the HuggingFace layer, run unchanged on ``device``, on
    batches of calibration sequences given by index.

    ``batches`` groups sequences of one length without padding into batches of up to
    ``batch_size`` (their captured arguments are then identical); a padded sequence runs alone.
    The core runs per-sequence quantities (regional gradients, RO steps) one index at a time.

    With ``share`` (calibration spread over torch.distributed ranks), ``samples`` are this rank's
    sequences, ``share.indices`` their indices among all ``share.nsamples``; the core addresses
    sequences by those indices and sums over the ranks through ``all_reduce``.
    """

    def __init__(
        self,
        adapter: DecoderAdapter,
        index: int,
        samples: list[Sample],
        device: torch.device,
        batch_size: int = 1,
        share: Share | None = None,
        autocast: torch.dtype | None = None,
    ):
        self.layer = adapter.layers[index]
        self.kind = adapter.kinds[index]
        self.matrices = adapter.targets(index)
        self.share = share or Share(None, len(samples))
        self.indices = self.share.indices
        if len(self.indices) != len(samples):
            raise AssertionError(f"{len(samples)} samples for a share of {len(self.indices)} sequences")
        #: By sequence index: the sample, and on the offload device the dense block's outputs (set
        #: by the core from its first pass) and the pruned block's (its last pass: the next inputs).
        self.samples = dict(zip(self.indices, samples))
        self.targets: dict[int, torch.Tensor | None] = dict.fromkeys(self.indices)
        self.results: dict[int, torch.Tensor | None] = dict.fromkeys(self.indices)
        self.device = device
        self.batch_size = batch_size
        self.pin = pinned_offload(samples[0].hidden.device, device)
        self._arguments: dict[Any, dict[str, Any]] = {}
        #: The dtype RO's training forwards run in under torch.autocast (training_autocast); None: the model's own.
        self.autocast = autocast

    def __len__(self) -> int:
        return self.share.nsamples

    def local(self) -> list[int]:
        return self.indices

    def world_size(self) -> int:
        return 1 if self.share.world is None else self.share.world.size

    def all_reduce(self, tensors: list[torch.Tensor]) -> None:
        assert self.share.world is not None, "the core sums over processes only when world_size() > 1"
        self.share.world.all_reduce(tensors)

    def batches(self, indices: list[int]) -> list[list[int]]:
        out: list[list[int]] = []
        open_batches: dict[tuple[int, ...], list[int]] = {}
        for i in indices:
            key = self._sharing_key(self.samples[i])
            if self.batch_size == 1 or key is None:
                out.append([i])
                continue
            batch = open_batches.setdefault(key, [])
            batch.append(i)
            if len(batch) == self.batch_size:
                out.append(open_batches.pop(key))
        return out + [b for b in open_batches.values() if b]

    def forward(self, indices: list[int]) -> torch.Tensor:
        """The block's output [len(indices), seq, hidden] (with autograd when grad mode is on)."""
        first = self.samples[indices[0]]
        kwargs = self._device_arguments(first)
        if len(indices) == 1:
            hidden = first.hidden.to(self.device, non_blocking=True)
        else:
            hidden = torch.cat([self.samples[i].hidden.to(self.device, non_blocking=True) for i in indices])
            kwargs = _expand_batch(kwargs, len(indices))
        return DecoderAdapter.call(self.layer, hidden, kwargs)

    def training_forward(self, indices: list[int]) -> torch.Tensor:
        """The forward of an RO training step (the core calls it under grad mode): ``forward``,
        under ``torch.autocast`` to ``self.autocast`` when set. Its output serves only the step's
        gradient, which reaches the float32 weights in float32."""
        if self.autocast is None:
            return self.forward(indices)
        with torch.autocast(self.device.type, dtype=self.autocast):
            return self.forward(indices)

    @staticmethod
    def _sharing_key(sample: Sample) -> tuple[int, ...] | None:
        """Sequences of one shape without padding have identical block arguments (positions
        0..seq-1, the plain causal mask): they may share a batch and one device copy of their
        arguments. None for a padded sequence, whose arguments are its own."""
        return tuple(sample.hidden.shape) if sample.token_mask is None else None

    def _device_arguments(self, sample: Sample) -> dict[str, Any]:
        """The sample's block arguments on the device, copied once per block per sharing key."""
        key = self._sharing_key(sample) or id(sample)
        if key not in self._arguments:
            self._arguments[key] = move(sample.kwargs[self.kind], self.device, non_blocking=True)
        return self._arguments[key]

    def linear_inputs(self, indices: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One forward: each matrix's input ([b, seq, in] for a linear layer, [rows, in] for an
        expert: the real tokens routed to it) and the block output."""
        with self._recording(self.token_mask(indices)) as recorded:
            out = self.forward(indices)
        shape = (len(indices), self.samples[indices[0]].hidden.shape[1])
        return [x if t.expert is not None else _per_token(x, shape, t.name) for x, t in zip(recorded, self.matrices)], out

    def set_targets(self, indices: list[int], out: torch.Tensor) -> None:
        self._keep(self.targets, indices, out)

    def set_outputs(self, indices: list[int], out: torch.Tensor) -> None:
        self._keep(self.results, indices, out)

    def _keep(self, store: dict[int, torch.Tensor | None], indices: list[int], out: torch.Tensor) -> None:
        """Each sequence's rows of ``out``, padding zeroed, moved to where activations wait
        (pinned for a CUDA block: the copy does not wait; ``finish`` synchronises once)."""
        for i, row in zip(indices, out.detach().split(1)):
            s = self.samples[i]
            store[i] = stash(without_padding(row, s.token_mask), s.hidden.device, self.pin)

    def target(self, indices: list[int]) -> torch.Tensor:
        rows = [self.targets[i] for i in indices]
        if any(r is None for r in rows):
            raise RuntimeError("the core read a target before setting it")
        if len(rows) == 1:
            return rows[0].to(self.device, non_blocking=True)  # type: ignore[union-attr]
        return torch.cat([r.to(self.device, non_blocking=True) for r in rows])  # type: ignore[union-attr]

    def token_mask(self, indices: list[int]) -> torch.Tensor | None:
        """[len(indices), seq] bool, or None: only a sequence that runs alone has padding."""
        mask = self.samples[indices[0]].token_mask
        return None if mask is None else mask.to(self.device)

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        """The block's output for every sample as it is now, padding zeroed, on the offload device."""
        for batch in self.batches(self.indices):
            self.set_outputs(batch, self.forward(batch))
        return self.finish()

    def finish(self) -> list[torch.Tensor]:
        """The outputs handed to ``set_outputs`` (the next block's inputs), once every copy landed."""
        if self.pin:
            torch.cuda.synchronize(self.device)
        results = [self.results[i] for i in self.indices]
        if any(r is None for r in results):
            raise RuntimeError("the core did not hand the outputs of every sequence")
        return [r for r in results if r is not None]

    @contextmanager
    def _recording(self, token_mask: torch.Tensor | None) -> Iterator[list[torch.Tensor]]:
        by_linear: dict[int, torch.Tensor] = {}

        def keeper(k: int):
            def keep(_module: nn.Module, args: tuple) -> None:
                by_linear[k] = args[0].detach()

            return keep

        handles = [t.module.register_forward_pre_hook(keeper(k)) for k, t in enumerate(self.matrices) if t.expert is None]
        has_experts = any(t.expert is not None for t in self.matrices)
        recorded: list[torch.Tensor] = []
        try:
            with routed_inputs(self.matrices, token_mask) if has_experts else nullcontext(_no_experts) as routed:
                yield recorded
                recorded.extend(by_linear[k] if t.expert is None else routed(t) for k, t in enumerate(self.matrices))
        finally:
            for h in handles:
                h.remove()
