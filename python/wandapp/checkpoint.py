"""``prune_checkpoint``: pruning a sharded safetensors checkpoint that fits neither the device nor
the host's memory, block by block, resumable after a crash.

The model is built by transformers with every weight offloaded to disk where it already lies (the
source shards; accelerate's hooks read a module's tensors for its forward and drop them after),
so the dense pass that captures the first block's inputs holds one module at a time. Each block
is then loaded onto the device, pruned, and written as its own shard of the destination
checkpoint; only one block's weights and the calibration activations are ever in memory.

The destination folder doubles as the run's record (``.wandapp-run/``): after each block, its
shard and masks, the next block's inputs and the report so far are written (each file written
beside its final name and renamed over it, then the state file the same way, which is the commit
point), so a run killed at any moment, SIGKILL included, resumes with the same call at its first
unfinished block and ends bit-identical to an uninterrupted run. A resumed run checks that the
model, the calibration data and the settings hash to the recorded ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterable, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from wandapp import _core, owl
from wandapp.block import training_autocast
from wandapp.capture import Sample, stash, pinned_offload
from wandapp.config import RO_METHODS, Pattern, PruneConfig, parse_method, parse_sparsity
from wandapp.data import Sequence, collect_sequences, sequences_sha256
from wandapp.distributed import World, guarded
from wandapp.errors import CheckpointError, InvalidArgumentError, PruneError, ResumeMismatchError, UnsupportedModelError
from wandapp.masks import save_masks
from wandapp.prune import Job, Resumed, last_check, prepare, prune_blocks
from wandapp.report import PruneReport

#: The run's record inside the destination folder.
RUN_DIR = ".wandapp-run"
#: The pruned matrices' masks, one file per block (``wandapp.load_masks`` reads the folder).
MASKS_DIR = "masks"
_STATE_VERSION = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def prune_checkpoint(
    src: Union[str, os.PathLike[str]],
    dst: Union[str, os.PathLike[str]],
    calib_loader: Iterable[Any],
    *,
    sparsity: Union[float, str] = 0.5,
    method: str = "wanda++",
    config: PruneConfig | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> PruneReport:
    """Prunes the checkpoint in folder ``src`` (``save_pretrained`` output: sharded or single
    safetensors) into folder ``dst``, streaming it block by block: peak host memory is about one
    block's weights plus the calibration activations, whatever the depth (bench/results/memory.md).

    ``dst`` receives a checkpoint that ``from_pretrained(dst)`` loads (one shard per decoder
    block, one per other tensor, an index, the config and every other non-weight file of ``src``
    such as the tokenizer), ``masks/`` (one masks file per block; ``wandapp.load_masks(dst +
    "/masks")`` reads them all) and ``report.json``. ``src`` is only read.

    Calling it again with the same arguments after a crash (even SIGKILL) resumes at the first
    unfinished block, with bit-identical masks and weights to a run that was never stopped; after a
    finished run it returns the recorded report without loading the model. Before either it checks that the
    model's files (every byte of the weights and config.json), the calibration token ids and the
    settings (config, method, sparsity, dtype, device, wandapp version) hash to the recorded ones.

    Args:
        src: the checkpoint's folder (only read).
        dst: the output folder; it must be new, empty, or hold a run of this function.
        calib_loader: as ``wandapp.prune``.
        sparsity: as ``wandapp.prune``.
        method: as ``wandapp.prune``.
        config: as ``wandapp.prune``.
        **overrides: as ``wandapp.prune``.
        dtype: the dtype to load and write the weights in; None keeps the checkpoint's own.

    The device is ``config.device``, else ``cuda`` when available, else the CPU. Without a
    ``config``, ``dense_check`` defaults to False here: the whole dense pass reads every weight
    from disk once per calibration sequence; without it only the replay check's sequence does
    (``layer_sparsity="owl"`` needs the whole pass).

    Returns the ``PruneReport``. Its ``masks`` property reads every mask from ``dst/masks``
    into memory (one byte per weight): for a big model, read the per-block files one at a time.

    Under a torch.distributed group of several ranks (torchrun), call it on every rank with the
    same arguments (``dst`` on a filesystem every rank sees): each rank streams the model and runs
    its share of the calibration as in ``wandapp.prune``; each records its own block inputs,
    and rank 0 writes the checkpoint, masks and report. A resume needs the same number of ranks.

    Raises everything ``wandapp.prune`` raises, before any block is written;
    InvalidArgumentError when ``src`` holds no safetensors checkpoint or ``dst`` holds other
    files; UnsupportedModelError when the checkpoint's tensor names are not the model's (a
    checkpoint that transformers converts on load: load it with ``from_pretrained`` and use
    ``wandapp.prune``); ResumeMismatchError when ``dst`` records a run of another model,
    calibration data or settings. A failure part-way raises PruneError; the blocks written so far
    stay recorded and the same call resumes.

    Example::

        report = wandapp.prune_checkpoint("Llama-2-70b-hf", "Llama-2-70b-2of4", calib_ids, sparsity="2:4")
    """
    world = World.current()
    with guarded(world):  # a rank that fails anywhere stops the others
        return last_check(world, _prune_checkpoint(os.fspath(src), os.fspath(dst), calib_loader, sparsity, method, config, dtype, overrides, world))


def _prune_checkpoint(
    src: str, dst: str, calib_loader: Iterable[Any], sparsity: Union[float, str], method: str,
    config: PruneConfig | None, dtype: torch.dtype | None, overrides: dict[str, Any], world: World | None,
) -> PruneReport:
    weight_map = source_weight_map(src)
    check_source(src, weight_map)  # before anything is read into a model or written in dst
    cfg = (config or PruneConfig(dense_check=False)).replace(**overrides)
    if cfg.device is None:
        cfg = cfg.replace(device="cuda" if torch.cuda.is_available() else "cpu")
    _require_usable_destination(dst)
    sequences = collect_sequences(calib_loader, cfg.nsamples)
    fingerprint = _fingerprint(src, weight_map, sequences, cfg, parse_method(method), parse_sparsity(sparsity), dtype, world)
    if world is not None:
        world.require_same("checkpoints, calibration data or settings", json.dumps(fingerprint, sort_keys=True).encode())
    state = read_record(dst, fingerprint)
    if world is not None:  # a dst that not every rank sees would send the ranks down different paths
        seen = None if state is None else [state["captured"], state["blocks_done"], state["finished"]]
        world.require_same(f"records in {dst!r}", json.dumps(seen).encode(), "dst must be one folder every rank sees (a shared filesystem)")
    if state is not None and state["finished"]:
        _drop_run_files(os.path.join(dst, RUN_DIR))  # left behind by a kill right after the last commit
        return _recorded_report(dst, state)
    with tempfile.TemporaryDirectory(prefix="wandapp-offload-") as offload_folder:
        model = load_offloaded(src, torch.device(cfg.device), offload_folder, dtype)
        with torch.inference_mode(False), torch.enable_grad():
            job = prepare(model, None, sparsity, method, cfg, {}, sequences, world=world)
            run = CheckpointRun(src, dst, weight_map, job, dtype, fingerprint, state)
            try:
                report = prune_blocks(job, run)
            except PruneError as err:
                if err.block is not None:
                    err.args = (f"{err} {dst!r} keeps the blocks before it: the same call resumes at block {err.block}.", *err.args[1:])
                raise
            run.finish(report)
    return report


def source_weight_map(src: str) -> dict[str, str]:
    """{tensor name: shard file name} of the safetensors checkpoint in ``src``."""
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise InvalidArgumentError(f"{src!r} holds no config.json: pass a folder written by save_pretrained")
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("weight_map is not a {tensor: file} object")
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index!r} is not a readable index ({type(err).__name__}: {err}); save the checkpoint again") from err
        return dict(weight_map)
    single = "model.safetensors"
    if os.path.isfile(os.path.join(src, single)):
        return dict.fromkeys(_shard_header(src, single), single)
    raise InvalidArgumentError(
        f"{src!r} holds no safetensors checkpoint (model.safetensors or model.safetensors.index.json); "
        "prune_checkpoint streams safetensors shards: convert it with save_pretrained(..., safe_serialization=True)"
    )


#: Bytes per element of safetensors' dtype names (those not listed are not size-checked).
_SAFETENSORS_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _shard_header(src: str, file: str) -> dict[str, tuple[str, list[int]]]:
    """{tensor: (dtype, shape)} of one safetensors file, read from its header, after checking that
    the file is as long as the header says (a truncated copy is refused here, not half-way through
    the run). CheckpointError naming the file otherwise."""
    path = os.path.join(src, file)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path!r} is missing")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length > size - 8:
                raise ValueError(f"its header claims {length} bytes but the file has {size}")
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        tensors, end = {}, 0
        for name, info in header.items():
            dtype, shape, (start, stop) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
            count = 1
            for d in shape:
                count *= d
            if dtype in _SAFETENSORS_BYTES and stop - start != count * _SAFETENSORS_BYTES[dtype]:
                raise ValueError(f"tensor {name!r} takes {stop - start} bytes, but {dtype} {shape} needs {count * _SAFETENSORS_BYTES[dtype]}")
            tensors[name], end = (dtype, shape), max(end, int(stop))
    except (ValueError, KeyError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path!r} is not a readable safetensors file ({err}); copy or save it again") from err
    if 8 + length + end > size:
        raise CheckpointError(
            f"{path!r} is truncated: its header needs {8 + length + end} bytes, the file has {size} "
            f"(the data of e.g. {next(iter(tensors), '?')!r} is cut); copy it again"
        )
    return tensors


def check_source(src: str, weight_map: dict[str, str]) -> None:
    """Refuses an incomplete or inconsistent checkpoint with a CheckpointError naming the file
    and tensor, before any model is built on it and before anything is written in ``dst``: every
    shard the index names exists and is whole, the index lists every tensor its shards hold and
    nothing they lack (a stale index would make the output silently lack a tensor), and every
    tensor the model needs is there with its shape and kind (float or not). A checkpoint whose
    names transformers converts on load (tensors the model does not know beside ones it lacks) is
    left to the conversion check (UnsupportedModelError)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    headers = {file: _shard_header(src, file) for file in sorted(set(weight_map.values()))}
    for name, file in weight_map.items():
        if name not in headers[file]:
            raise CheckpointError(f"the index of {src!r} puts tensor {name!r} in {file!r}, which does not hold it; save the checkpoint again")
    for file, tensors in headers.items():
        for name in tensors:
            if weight_map.get(name) != file:
                where = "does not list it" if name not in weight_map else f"puts it in {weight_map[name]!r}"
                raise CheckpointError(
                    f"{os.path.join(src, file)!r} holds tensor {name!r} but the index (model.safetensors.index.json) {where}: "
                    "the index is stale, and the output would lack the tensor. Save the checkpoint again (save_pretrained) "
                    "or fix the index's weight_map"
                )
    stored = {name: headers[file][name] for name, file in weight_map.items()}
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    skeleton.tie_weights()  # from_config on meta leaves tied weights apart; save_pretrained stores one of them
    places: dict[int, list[str]] = {}  # tied tensors: one stored name is enough
    for name, tensor in skeleton.state_dict(keep_vars=True).items():
        places.setdefault(id(tensor), []).append(name)
    missing = [names for names in places.values() if not any(n in stored for n in names)]
    if missing and set(stored) <= {n for names in places.values() for n in names}:
        raise CheckpointError(
            f"{src!r} lacks tensor {missing[0][0]!r} (and {len(missing) - 1} more) that {type(skeleton).__name__} needs: "
            "a shard or an index entry is missing; save the checkpoint again"
        )
    state = skeleton.state_dict(keep_vars=True)
    for name, (dtype, shape) in stored.items():
        if name not in state:
            continue
        expected = state[name]
        if list(expected.shape) != shape or (dtype in _FLOAT_DTYPES) != expected.is_floating_point():
            raise CheckpointError(
                f"tensor {name!r} in {os.path.join(src, weight_map[name])!r} is {dtype} {shape}, but the model's config "
                f"needs {'a float' if expected.is_floating_point() else str(expected.dtype)} tensor of shape {list(expected.shape)}; "
                "the checkpoint does not match its config.json"
            )


def load_offloaded(src: str, device: torch.device, offload_folder: str, dtype: torch.dtype | None = None) -> nn.Module:
    """The model in ``src`` with every weight offloaded to disk where it lies (nothing is copied):
    accelerate loads each module's tensors for its forward on ``device`` and drops them after."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from wandapp.adapters import resolve

    if device.type == "cuda" and device.index is None:  # the current GPU (a rank's, under torchrun), as torch reads "cuda"
        device = torch.device("cuda", torch.cuda.current_device())
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    device_map = _disk_map(skeleton, resolve(skeleton).prefix, device)
    return AutoModelForCausalLM.from_pretrained(src, device_map=device_map, offload_folder=offload_folder, dtype=dtype or "auto").eval()


def _disk_map(skeleton: nn.Module, prefix: str, device: torch.device) -> dict[str, str]:
    """A device map with each decoder block, and every other module along the way that holds
    weights, on "disk"; modules without saved tensors (rotary embeddings) on ``device``, which
    makes it the hooks' execution device."""
    device_map: dict[str, str] = {}
    module, path = skeleton, ""
    for part in prefix.split("."):
        for name, child in module.named_children():
            if name != part:
                device_map[path + name] = "disk" if child.state_dict() else str(device)
        if next(module.parameters(recurse=False), None) is not None:
            raise UnsupportedModelError(f"{type(skeleton).__name__} keeps weights directly on {path.rstrip('.') or 'the model'}; prune_checkpoint cannot stream it")
        module, path = getattr(module, part), f"{path}{part}."
    device_map.update({f"{prefix}.{i}": "disk" for i in range(len(module))})
    return device_map


def _require_usable_destination(dst: str) -> None:
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise InvalidArgumentError(f"the destination {dst!r} is a file; pass a folder")
    if os.path.isdir(dst) and set(os.listdir(dst)) - {RUN_DIR} and not os.path.isfile(os.path.join(dst, RUN_DIR, "state.json")):
        raise InvalidArgumentError(
            f"the destination {dst!r} holds files but no run of prune_checkpoint; pass a new or empty folder"
        )


def _sha256_files(paths: list[str], progress: bool) -> str:
    """SHA-256 of the files' names and bytes (about a minute per 100 GB; a bar when ``progress``)."""
    digest = hashlib.sha256()
    total = sum(os.path.getsize(p) for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="wandapp: hashing the checkpoint", disable=not progress) as bar:
        for path in paths:
            digest.update(os.path.basename(path).encode() + b"\0")
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest()


def _fingerprint(
    src: str, weight_map: dict[str, str], sequences: list[Sequence], cfg: PruneConfig, method: str, pattern: Pattern,
    dtype: torch.dtype | None, world: World | None = None,
) -> dict[str, str]:
    """What a resumed run must share with the recorded one, hashed: every byte of the model's
    files, the calibration token ids, and the settings that change the result (the number of
    ranks among them: each records its own share; ``ro_autocast="auto"`` as this machine
    resolves it)."""
    files = [os.path.join(src, "config.json"), *sorted({os.path.join(src, f) for f in weight_map.values()})]
    resolved = cfg.replace(nsamples=len(sequences), ro_samples=cfg.ro_samples_for(len(sequences)))
    settings = {k: v for k, v in resolved.to_dict().items() if k != "progress"}
    settings.update(method=method, sparsity=str(pattern), dtype=str(dtype), wandapp=_core.__version__)
    if method in RO_METHODS and cfg.ro_autocast == "auto":  # a machine of another kind would resolve it otherwise
        # The checkpoint's own dtype (dtype None) is not known before loading: taken as float32,
        # the one dtype autocast applies to, so a resume that could differ is refused.
        resolved_autocast = training_autocast("auto", torch.device(cfg.device), dtype or torch.float32)
        settings["ro_autocast"] = "off" if resolved_autocast is None else "bfloat16"
    if world is not None:  # each rank runs on its own device of the same kind
        settings["ranks"] = world.size
        for where in ("device", "offload"):
            settings[where] = None if settings[where] is None else torch.device(settings[where]).type
    return {
        "model": _sha256_files(files, cfg.progress),
        "calibration data": sequences_sha256(sequences),
        "settings": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
    }


def read_record(dst: str, fingerprint: dict[str, str]) -> dict[str, Any] | None:
    """The state recorded in ``dst``, or None for a new run; ResumeMismatchError when it records
    a run of another model, calibration data or settings."""
    path = os.path.join(dst, RUN_DIR, "state.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    differ = [k for k, v in fingerprint.items() if state.get("fingerprint", {}).get(k) != v]
    if state.get("version") != _STATE_VERSION or differ:
        raise ResumeMismatchError(
            f"{dst!r} records a run of prune_checkpoint with other {', '.join(differ) or 'record version'} "
            f"(recorded hashes: {state.get('fingerprint')}); resume with the same model, calibration data and "
            "settings, or pass a new destination folder (or delete this one to start over)"
        )
    return state


def _recorded_report(dst: str, state: dict[str, Any]) -> PruneReport:
    report = PruneReport.from_dict(state["report"])
    report.masks_folder = os.path.join(dst, MASKS_DIR)
    return report


def _drop_run_files(folder: str) -> None:
    """Removes what a finished run no longer needs from its run folder: everything but the state
    (the block inputs alone are nsamples x seqlen x hidden floats, gigabytes for a 7B model)."""
    for name in os.listdir(folder):
        if name != "state.json":
            with contextlib.suppress(FileNotFoundError):  # another rank removed its last inputs
                os.remove(os.path.join(folder, name))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic(path: str, write: Any) -> None:
    """``write(tmp)`` beside ``path``, flushed to disk, then renamed over it (and the rename
    flushed): neither a kill nor a power loss leaves half a file under ``path``."""
    tmp = f"{path}.partial"
    write(tmp)
    _fsync(tmp)
    os.replace(tmp, path)
    try:
        _fsync(os.path.dirname(path) or ".")
    except OSError:  # a filesystem that cannot sync a folder: the rename is still atomic
        pass


class CheckpointRun:
    """The destination folder of ``prune_checkpoint``: the block loop hands it each finished
    block (``prune.BlockSink``), and it holds what a resumed run needs.

    Across torch.distributed ranks (``job.world``), each rank records its own share's block inputs
    and arguments (files named with its rank); rank 0 alone writes the checkpoint, the masks and
    the state, and commits a block only after every rank has recorded its part (``_sync``).
    """

    def __init__(
        self, src: str, dst: str, weight_map: dict[str, str], job: Job, dtype: torch.dtype | None, fingerprint: dict[str, str], state: dict[str, Any] | None
    ) -> None:
        self.src, self.dst, self.weight_map, self.job, self.dtype = src, dst, weight_map, job, dtype
        self.folder = os.path.join(dst, RUN_DIR)
        self.world = job.world
        #: Whether this process writes the checkpoint, masks and state (rank 0, or the only process).
        self.writes = job.world is None or job.world.rank == 0
        #: The name suffix of this rank's own record files.
        self.mine = "" if job.world is None else f"-rank{job.world.rank:05d}"
        adapter = job.adapter
        self.prefix, self.blocks = adapter.prefix, len(adapter.layers)
        in_blocks = {f"{self.prefix}.{i}.": i for i in range(self.blocks)}
        self.others = [name for name in weight_map if not any(name.startswith(p) for p in in_blocks)]
        for i, layer in enumerate(adapter.layers):
            expected = {f"{self.prefix}.{i}.{k}" for k in layer.state_dict()}
            stored = {name for name in weight_map if name.startswith(f"{self.prefix}.{i}.")}
            if expected != stored:
                raise UnsupportedModelError(
                    f"block {i}'s tensors in {src!r} ({sorted(stored - expected)[:2] or sorted(stored)[:2]}) are not the model's "
                    f"({sorted(expected - stored)[:2]}): transformers converts this checkpoint on load. Load it with "
                    "from_pretrained (device_map='auto' offloads what does not fit) and use wandapp.prune + save_pretrained"
                )
        total = self.blocks + len(self.others)
        self.shard = lambda k: f"model-{k + 1:05d}-of-{total:05d}.safetensors"  # noqa: E731
        os.makedirs(self.folder, exist_ok=True)
        if state is None:
            state = {"version": _STATE_VERSION, "fingerprint": fingerprint, "captured": False, "blocks_done": 0, "finished": False}
            self._commit(state)
        self.state = state

    def _commit(self, state: dict[str, Any]) -> None:
        """Records ``state`` (rank 0; every rank keeps it): the commit point of everything written
        before it, on every rank (call ``_sync`` first)."""

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(state, f)

        if self.writes:
            _atomic(os.path.join(self.folder, "state.json"), write)
        self.state = state

    def _sync(self) -> None:
        """Across ranks: returns once every rank got here (raises if one failed)."""
        if self.world is not None:
            self.world.check()

    # -- prune.BlockSink ------------------------------------------------------------------
    def resume(self, job: Job) -> Resumed | None:
        if not self.state["captured"]:
            return None
        report = _recorded_report(self.dst, self.state)
        layers = self.state["owl"] and owl.LayerSparsity(
            {int(k): v for k, v in self.state["owl"]["outlier_ratio"].items()},
            {int(k): v for k, v in self.state["owl"]["block_sparsity"].items()},
            self.state["owl"]["pruned_per_row"],
        )
        return Resumed(self.state["blocks_done"], self._load_samples(job, self.state["blocks_done"]), layers, report)

    def started(self, samples: list[Sample], layers: owl.LayerSparsity | None, report: PruneReport) -> None:
        extras = [{"kwargs": s.kwargs, "token_mask": s.token_mask} for s in samples]
        path = self._arguments()
        _atomic(path, lambda tmp: torch.save(extras, tmp))
        try:  # read back now, as a resumed run will: a record that cannot be resumed fails here, not then
            torch.load(path, weights_only=True)
        except Exception as err:
            raise UnsupportedModelError(
                f"the arguments {type(self.job.adapter.model).__name__} passes its blocks cannot be recorded for a resume "
                f"({type(err).__name__}: {err}); load the model with from_pretrained and use wandapp.prune"
            ) from err
        self._save_inputs(samples, 0)
        self._sync()
        report.masks_folder = os.path.join(self.dst, MASKS_DIR)
        owl_plan = None if layers is None else {"outlier_ratio": layers.outlier_ratio, "block_sparsity": layers.block_sparsity, "pruned_per_row": layers.pruned_per_row}
        self._commit({**self.state, "captured": True, "blocks_done": 0, "report": report.to_dict(), "owl": owl_plan})

    def write_block(self, index: int, layer: nn.Module) -> None:
        if not self.writes:
            return
        tensors: dict[str, torch.Tensor] = {}
        storages: set[int] = set()
        for name, value in layer.state_dict().items():
            t = value.detach().to("cpu").contiguous()
            if t.untyped_storage().data_ptr() in storages:  # a tied tensor: safetensors stores each storage once
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
            tensors[f"{self.prefix}.{index}.{name}"] = t
        _atomic(os.path.join(self.dst, self.shard(index)), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))

    def finished_block(self, index: int, samples: list[Sample], report: PruneReport) -> None:
        names = list(report.blocks[index].layers)
        if names:
            masks = report.take_masks(names)  # on disk from now on: host memory stays one block's
            if self.writes:
                os.makedirs(os.path.join(self.dst, MASKS_DIR), exist_ok=True)
                path = os.path.join(self.dst, MASKS_DIR, f"block-{index:05d}.safetensors")
                _atomic(path, lambda tmp: save_masks(tmp, masks, report=report))
        self._save_inputs(samples, index + 1)
        self._sync()
        self._commit({**self.state, "blocks_done": index + 1, "report": report.to_dict()})
        self._sync()
        with contextlib.suppress(FileNotFoundError):  # rank 0's finish() may have cleared the record already
            os.remove(self._inputs(index))  # only after the commit: until then a resumed run needs it

    # -- a block's inputs -----------------------------------------------------------------
    def _inputs(self, index: int) -> str:
        """The file of block ``index``'s inputs: one per block, so a kill between writing the next
        block's and committing never leaves the recorded block with the wrong inputs."""
        return os.path.join(self.folder, f"inputs-{index:05d}{self.mine}.safetensors")

    def _arguments(self) -> str:
        """The file of the block arguments of this rank's sequences."""
        return os.path.join(self.folder, f"arguments{self.mine}.pt")

    def _save_inputs(self, samples: list[Sample], index: int) -> None:
        hidden = {str(i): s.hidden.detach().to("cpu").contiguous() for i, s in enumerate(samples)}
        _atomic(self._inputs(index), lambda tmp: save_file(hidden, tmp))

    def _load_samples(self, job: Job, index: int) -> list[Sample]:
        if index == self.blocks:  # every block recorded; only finish() was left
            return []
        extras = torch.load(self._arguments(), weights_only=True)
        hidden = load_file(self._inputs(index))
        pin = pinned_offload(job.offload, job.device)
        samples = [Sample(stash(hidden[str(i)], job.offload, pin), e["kwargs"], e["token_mask"]) for i, e in enumerate(extras)]
        if pin:
            torch.cuda.synchronize()
        return samples

    # -- the rest of the checkpoint -------------------------------------------------------
    def finish(self, report: PruneReport) -> None:
        """Writes every tensor outside the blocks (one shard each, read one at a time), the
        index, the config and the source's other files, and the report; drops the inputs (rank 0)."""
        if not self.writes:
            return
        weight_map = {name: self.shard(i) for i in range(self.blocks) for name in self._block_names(i)}
        for k, name in enumerate(self.others):
            with safe_open(os.path.join(self.src, self.weight_map[name]), "pt") as f:
                tensor = f.get_tensor(name)
            if self.dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(self.dtype)
            shard = self.shard(self.blocks + k)
            _atomic(os.path.join(self.dst, shard), lambda tmp: save_file({name: tensor}, tmp, metadata={"format": "pt"}))
            weight_map[name] = shard
        size = sum(os.path.getsize(os.path.join(self.dst, f)) for f in set(weight_map.values()))
        index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}

        def write_index(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)

        _atomic(os.path.join(self.dst, "model.safetensors.index.json"), write_index)
        for name in os.listdir(self.src):
            path = os.path.join(self.src, name)
            if os.path.isfile(path) and not name.endswith(_WEIGHT_SUFFIXES) and not name.endswith(".index.json"):
                shutil.copyfile(path, os.path.join(self.dst, name))
        self.job.adapter.model.config.save_pretrained(self.dst)  # the dtype it was written in
        report.to_json(os.path.join(self.dst, "report.json"))
        self._commit({**self.state, "finished": True, "report": report.to_dict()})
        _drop_run_files(self.folder)

    def _block_names(self, index: int) -> list[str]:
        return [name for name in self.weight_map if name.startswith(f"{self.prefix}.{index}.")]
