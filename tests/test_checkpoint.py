"""``wandapp.prune_checkpoint`` (python/wandapp/checkpoint.py): a sharded checkpoint pruned block by
block equals the model pruned in memory bit for bit; a run stopped at any of its writes (and a
process killed by SIGKILL) resumes to the same result; a resumed run refuses another model, data or
settings."""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ARCHITECTURES, calib_ids, tiny_architecture, tiny_model
from safetensors.torch import load_file

import wandapp
from wandapp.checkpoint import RUN_DIR

pytest.importorskip("accelerate")
from transformers import AutoModelForCausalLM  # noqa: E402

FAST = dict(ro_samples=6, ro_holdout=2, ro_rounds=2, progress=False)
IDS = calib_ids(8, 16)


def save_sharded(folder, **overrides) -> str:
    """A tiny random LLaMA saved in several safetensors shards."""
    tiny_model(**overrides).save_pretrained(folder, max_shard_size="100KB")
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    return str(folder)


def written_tensors(folder) -> dict[str, torch.Tensor]:
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        files = set(json.load(f)["weight_map"].values())
    out: dict[str, torch.Tensor] = {}
    for name in files:
        out.update(load_file(os.path.join(folder, name)))
    return out


def assert_same_masks(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "method, sparsity, extra",
    [
        ("wanda", "2:4", {}),
        ("wanda++", "2:4", {}),
        ("sparsegpt", 0.5, {}),
        ("wanda", 0.5, {"layer_sparsity": "owl", "owl_lambda": 0.2}),
        ("wanda", 0.5, {"ignore": r".*\.layers\.1\..*"}),  # block 1 written as it was
    ],
)
def test_streamed_checkpoint_equals_the_model_pruned_in_memory(method, sparsity, extra, tmp_path):
    src = save_sharded(tmp_path / "src", num_hidden_layers=4)
    reference = AutoModelForCausalLM.from_pretrained(src)
    expected = wandapp.prune(reference, IDS, method=method, sparsity=sparsity, **FAST, **extra)

    dst = tmp_path / "dst"
    report = wandapp.prune_checkpoint(src, dst, IDS, method=method, sparsity=sparsity, **FAST, **extra)

    assert_same_masks(report.masks, expected.masks)
    assert_same_masks(wandapp.load_masks(dst / "masks"), expected.masks)
    reloaded = AutoModelForCausalLM.from_pretrained(dst)
    for name, value in reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    assert json.loads((dst / "report.json").read_text())["achieved_sparsity"] == pytest.approx(expected.achieved_sparsity)
    # Blocks are written one shard each; the source is never written.
    assert len([f for f in os.listdir(dst) if f.endswith(".safetensors")]) == 4 + 3


def test_tied_embeddings_single_file_and_dtype(tmp_path):
    src = tmp_path / "src"
    tiny_model(tie_word_embeddings=True).save_pretrained(src)  # one model.safetensors, lm_head tied
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    expected = wandapp.prune(reference, IDS, method="wanda", **FAST)
    report = wandapp.prune_checkpoint(src, tmp_path / "dst", IDS, method="wanda", dtype=torch.bfloat16, **FAST)
    assert_same_masks(report.masks, expected.masks)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    assert reloaded.dtype == torch.bfloat16 and reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(reloaded(IDS[:2]).logits, reference(IDS[:2]).logits)


RUN = dict(method="wanda++", sparsity="2:4", **FAST)


def state(dst) -> dict | None:
    try:
        with open(os.path.join(dst, RUN_DIR, "state.json")) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def recording_stops(monkeypatch, dst, into) -> list[tuple[str, object]]:
    """Copies ``dst`` at every point where a kill leaves a distinct folder: each of the run's
    atomic writes (checkpoint shards, masks, block inputs, arguments, index, the state that
    commits them) half written under its ``.partial`` name, and just after its rename. A kill
    leaves exactly the files on disk (nothing in memory survives it), so resuming each copy is
    resuming after a kill at that point. Returns the (point, copy) list, filled as the run goes."""
    from wandapp import checkpoint

    stops: list[tuple[str, object]] = []
    real = checkpoint._atomic

    def copy(point: str, half: str | None = None):
        folder = into / f"stop{len(stops):03d}"
        shutil.copytree(dst, folder)
        if half is not None:
            partial = folder / os.path.relpath(half, dst)
            partial.write_bytes(partial.read_bytes()[: partial.stat().st_size // 2])
        stops.append((point, folder))

    def atomic(path, write):
        name = os.path.relpath(path, dst)

        def written_halfway(tmp):
            write(tmp)
            copy(f"writing {name}", half=tmp)

        real(path, written_halfway)
        copy(f"after renaming {name}")

    monkeypatch.setattr(checkpoint, "_atomic", atomic)
    return stops


def test_a_run_stopped_at_any_write_resumes_to_the_same_result(tmp_path, monkeypatch):
    src = save_sharded(tmp_path / "src", num_hidden_layers=3)
    dst = tmp_path / "dst"
    stops = recording_stops(monkeypatch, dst, tmp_path)
    expected = wandapp.prune_checkpoint(src, dst, IDS, **RUN)
    monkeypatch.undo()
    expected_tensors = written_tensors(dst)
    points = [point for point, _ in stops]
    # Every kind of write was stopped at: the state's commits, each block's shard, masks and next inputs, the index.
    for name in ("state.json", "arguments.pt", "inputs-00000", "inputs-00003", "model-00001-of", "model-00003-of", "block-00002", "index.json"):
        assert any(name in p for p in points), (name, points)

    for point, folder in stops:
        at_stop = state(folder)
        report = wandapp.prune_checkpoint(src, folder, IDS, **RUN)
        assert_same_masks(report.masks, expected.masks)
        assert [(b.ro_steps, b.ro_stop) for b in report.blocks] == [(b.ro_steps, b.ro_stop) for b in expected.blocks], point
        tensors = written_tensors(folder)
        assert tensors.keys() == expected_tensors.keys(), point
        assert all(torch.equal(tensors[k], expected_tensors[k]) for k in tensors), point
        assert sorted(os.listdir(folder / RUN_DIR)) == ["state.json"], point  # nothing left behind, also after the last commit
        assert not [f for _, _, files in os.walk(folder) for f in files if f.endswith(".partial")], point
        if at_stop is not None and at_stop["captured"]:
            # Resumed, not redone: the blocks recorded before the stop keep their recorded timings.
            for i in range(at_stop["blocks_done"]):
                assert report.blocks[i].seconds == at_stop["report"]["blocks"][i]["seconds"], point


WORKER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from conftest import calib_ids
    import wandapp
    from wandapp import checkpoint

    real = checkpoint._atomic

    def atomic(path, write):  # SIGKILL right after the state records block 2
        real(path, write)
        if path.endswith("state.json") and checkpoint.json.load(open(path))["blocks_done"] == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint._atomic = atomic
    wandapp.prune_checkpoint({src!r}, {dst!r}, calib_ids(8, 16), **{run!r})
    """
)


def test_a_process_killed_by_sigkill_resumes_to_the_same_result(tmp_path):
    """The stops above assume a kill leaves only the files: here a real process is killed."""
    src = save_sharded(tmp_path / "src", num_hidden_layers=3)
    expected = wandapp.prune_checkpoint(src, tmp_path / "uninterrupted", IDS, **RUN)
    dst = tmp_path / "dst"
    # A killed process cannot remove its temporary folders (the offload folder): they go beside dst.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    code = WORKER.format(tests=os.path.dirname(__file__), src=src, dst=str(dst), run=RUN)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "TMPDIR": str(scratch)}, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    at_kill = state(dst)
    assert at_kill["blocks_done"] == 2 and not at_kill["finished"]
    report = wandapp.prune_checkpoint(src, dst, IDS, **RUN)
    assert_same_masks(report.masks, expected.masks)
    tensors, reference = written_tensors(dst), written_tensors(tmp_path / "uninterrupted")
    assert tensors.keys() == reference.keys() and all(torch.equal(tensors[k], reference[k]) for k in reference)
    assert [b.seconds for b in report.blocks[:2]] == [b["seconds"] for b in at_kill["report"]["blocks"][:2]]


def test_resume_refuses_another_model_data_or_settings(tmp_path, monkeypatch):
    src = save_sharded(tmp_path / "src")
    dst = tmp_path / "dst"
    wandapp.prune_checkpoint(src, dst, IDS, method="wanda", **FAST)
    with pytest.raises(wandapp.ResumeMismatchError, match="calibration data"):
        wandapp.prune_checkpoint(src, dst, calib_ids(8, 16, seed=2), method="wanda", **FAST)
    with pytest.raises(wandapp.ResumeMismatchError, match="settings"):
        wandapp.prune_checkpoint(src, dst, IDS, method="wanda", sparsity=0.6, **FAST)
    other = save_sharded(tmp_path / "other", seed=1)
    with pytest.raises(wandapp.ResumeMismatchError, match="model"):
        wandapp.prune_checkpoint(other, dst, IDS, method="wanda", **FAST)
    # The same call: the recorded result, without loading the model.
    monkeypatch.setattr("wandapp.checkpoint.load_offloaded", lambda *a, **k: pytest.fail("a finished run loaded the model"))
    again = wandapp.prune_checkpoint(src, dst, IDS, method="wanda", **FAST)
    assert again.pruned_blocks == [0, 1] and len(again.masks) == 14


def test_resume_refuses_a_machine_that_resolves_ro_autocast_auto_otherwise(tmp_path, monkeypatch):
    src = save_sharded(tmp_path / "src")
    dst = tmp_path / "dst"
    native = wandapp.block.native_bfloat16(torch.device("cpu"))
    wandapp.prune_checkpoint(src, dst, IDS, method="wanda++", ro_autocast="auto", **FAST)
    monkeypatch.setattr("wandapp.block.native_bfloat16", lambda device: not native)
    with pytest.raises(wandapp.ResumeMismatchError, match="settings"):
        wandapp.prune_checkpoint(src, dst, IDS, method="wanda++", ro_autocast="auto", **FAST)
    # An explicit setting means the same on any machine: its run resumes on the other kind.
    monkeypatch.setattr("wandapp.block.native_bfloat16", lambda device: native)
    wandapp.prune_checkpoint(src, tmp_path / "off", IDS, method="wanda++", ro_autocast="off", **FAST)
    monkeypatch.setattr("wandapp.block.native_bfloat16", lambda device: not native)
    again = wandapp.prune_checkpoint(src, tmp_path / "off", IDS, method="wanda++", ro_autocast="off", **FAST)
    assert again.pruned_blocks == [0, 1]
    # Autocast applies to float32 weights only: a bfloat16 run's "auto" resumes on either kind.
    monkeypatch.setattr("wandapp.block.native_bfloat16", lambda device: native)
    wandapp.prune_checkpoint(src, tmp_path / "bf16", IDS, method="wanda++", ro_autocast="auto", dtype=torch.bfloat16, **FAST)
    monkeypatch.setattr("wandapp.block.native_bfloat16", lambda device: not native)
    again = wandapp.prune_checkpoint(src, tmp_path / "bf16", IDS, method="wanda++", ro_autocast="auto", dtype=torch.bfloat16, **FAST)
    assert again.pruned_blocks == [0, 1]


def test_bad_folders_are_refused_before_any_work(tmp_path):
    src = save_sharded(tmp_path / "src")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(wandapp.InvalidArgumentError, match="holds files but no run"):
        wandapp.prune_checkpoint(src, busy, IDS, **FAST)
    with pytest.raises(wandapp.InvalidArgumentError, match="no config.json"):
        wandapp.prune_checkpoint(tmp_path / "nothing", tmp_path / "dst", IDS, **FAST)
    pickled = tmp_path / "bin"  # a checkpoint in PyTorch's pickle format only
    model = tiny_model()
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(wandapp.InvalidArgumentError, match="no safetensors"):
        wandapp.prune_checkpoint(pickled, tmp_path / "dst", IDS, **FAST)
    assert not (tmp_path / "dst").exists()


def fail_core_call(monkeypatch, call: int, message: str):
    """Makes the ``call``-th block the core prunes raise RuntimeError(message); returns the undo."""
    core = sys.modules["wandapp.prune"]._core
    real = core.prune_block_
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError(message)
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "prune_block_", failing)
    return lambda: monkeypatch.setattr(core, "prune_block_", real)


def test_a_failed_block_stays_unrecorded_and_the_same_call_resumes(tmp_path, monkeypatch):
    src = save_sharded(tmp_path / "src", num_hidden_layers=4)
    expected = wandapp.prune_checkpoint(src, tmp_path / "uninterrupted", IDS, method="wanda", **FAST)

    undo = fail_core_call(monkeypatch, 3, "out of memory (injected)")
    dst = tmp_path / "dst"
    with pytest.raises(wandapp.PruneError, match="the same call resumes at block 2") as err:
        wandapp.prune_checkpoint(src, dst, IDS, method="wanda", **FAST)
    assert err.value.report.pruned_blocks == [0, 1] and state(dst)["blocks_done"] == 2
    undo()
    report = wandapp.prune_checkpoint(src, dst, IDS, method="wanda", **FAST)
    assert_same_masks(report.masks, expected.masks)
    tensors, reference = written_tensors(dst), written_tensors(tmp_path / "uninterrupted")
    assert all(torch.equal(tensors[k], reference[k]) for k in reference)


#: Architectures whose checkpoints transformers converts on load (it fuses their per-expert tensors
#: into one parameter per projection), so that a block's tensors on disk are not the model's:
#: prune_checkpoint refuses them. gpt_oss stores its experts fused already and streams.
CONVERTED_ON_LOAD = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"}


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_every_architecture_streams_and_resumes_or_is_refused_clearly(model_type, tmp_path, monkeypatch):
    """Each supported architecture streams, stops in block 1 and resumes there (the captured
    arguments reloaded from the run folder) to the in-memory result; those in CONVERTED_ON_LOAD
    are refused up front, before dst is created."""
    src = tmp_path / "src"
    tiny_architecture(model_type).save_pretrained(src)
    dst = tmp_path / "dst"
    if model_type in CONVERTED_ON_LOAD:
        with pytest.raises(wandapp.UnsupportedModelError, match="converts this checkpoint on load"):
            wandapp.prune_checkpoint(src, dst, IDS, method="wanda", **FAST)
        assert not dst.exists()
        return
    reference = AutoModelForCausalLM.from_pretrained(src)
    undo = fail_core_call(monkeypatch, 2, "stopped in block 1 (injected)")
    with pytest.raises(wandapp.PruneError, match="block 1"):
        wandapp.prune_checkpoint(src, dst, IDS, method="wanda", **FAST)
    undo()
    report = wandapp.prune_checkpoint(src, dst, IDS, method="wanda", **FAST)
    expected = wandapp.prune(reference, IDS, method="wanda", **FAST)
    assert_same_masks(report.masks, expected.masks)
    reloaded = AutoModelForCausalLM.from_pretrained(dst).state_dict()
    for name, value in reference.state_dict().items():
        assert torch.equal(reloaded[name], value), name


def test_a_stop_between_writing_the_next_inputs_and_the_commit_resumes_right(tmp_path, monkeypatch):
    """The next block's inputs are on disk but the state still names the block before: the
    resumed run must redo that block on its own inputs, not on the next block's."""
    from wandapp.checkpoint import CheckpointRun

    src = save_sharded(tmp_path / "src", num_hidden_layers=3)
    expected = wandapp.prune_checkpoint(src, tmp_path / "uninterrupted", IDS, method="wanda", **FAST)
    real = CheckpointRun._commit

    def commit(self, new_state):
        if new_state.get("blocks_done") == 1 and new_state.get("report") and self.state.get("blocks_done") == 0 and self.state["captured"]:
            raise OSError("disk full (injected) before the commit")
        real(self, new_state)

    monkeypatch.setattr(CheckpointRun, "_commit", commit)
    dst = tmp_path / "dst"
    with pytest.raises(wandapp.PruneError, match="disk full"):
        wandapp.prune_checkpoint(src, dst, IDS, method="wanda", **FAST)
    assert state(dst)["blocks_done"] == 0 and (dst / RUN_DIR / "inputs-00001.safetensors").exists()
    monkeypatch.setattr(CheckpointRun, "_commit", real)
    report = wandapp.prune_checkpoint(src, dst, IDS, method="wanda", **FAST)
    assert_same_masks(report.masks, expected.masks)
    tensors, reference = written_tensors(dst), written_tensors(tmp_path / "uninterrupted")
    assert all(torch.equal(tensors[k], reference[k]) for k in reference)
    assert os.listdir(dst / RUN_DIR) == ["state.json"]
