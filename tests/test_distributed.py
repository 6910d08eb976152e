"""Calibration spread over torch.distributed ranks (gloo on CPU): 1, 2 and 3 processes against the
single-process run, uneven shares, a failing rank, refusals. Each rank is a process of its own
running tests/distributed_worker.py, forked from a fork server that imported torch, transformers and
wandapp once (about 6 s of CPU saved per rank), and time-limited so that a hang fails the test instead
of blocking CI."""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.util
import os
import signal
import socket
import tempfile
import time

import pytest
import torch

import wandapp
from conftest import calib_ids, tiny_model

pytestmark = pytest.mark.processes

#: Seconds a group of ranks may take: a rank that waits for a collective that never comes fails the test.
TIME_LIMIT = 240


@pytest.fixture(scope="module", autouse=True)
def fork_server(tmp_path_factory):
    """Starts the fork server every rank is forked from: a fresh interpreter (with one OpenMP
    thread, as each rank runs) that has imported the worker and what it needs. Its socket's folder
    is one of pytest's, not the tests' TMPDIR (multiprocessing removes it when pytest exits); the
    ranks themselves inherit that TMPDIR, so what they leave is still caught."""
    multiprocessing.set_forkserver_preload(["distributed_worker", "transformers.models.llama.modeling_llama", "accelerate"])
    saved_threads, saved_tempdir = os.environ.get("OMP_NUM_THREADS"), tempfile.tempdir
    os.environ["OMP_NUM_THREADS"] = "1"
    tempfile.tempdir = str(tmp_path_factory.mktemp("fork-server"))
    try:
        multiprocessing.util.get_temp_dir()
        multiprocessing.forkserver.ensure_running()
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_threads is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved_threads


def run_ranks(tmp_path, world: int, **spec) -> list[dict]:
    """Runs ``world`` rank processes on one gloo group; returns each rank's saved result."""
    import distributed_worker

    context = multiprocessing.get_context("forkserver")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = {"layers": 3, "sparsity": 0.5, **spec}
    procs = []
    for rank in range(world):
        env = {"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(context.Process(target=distributed_worker.run_rank, args=(json.dumps(spec), str(tmp_path), env)))
        procs[-1].start()
    deadline = time.monotonic() + TIME_LIMIT
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    if any(p.is_alive() for p in procs):
        for p in procs:
            p.kill()
            p.join()
        pytest.fail(f"a rank hung: {world} ranks did not finish within {TIME_LIMIT} s ({spec})")
    for rank, p in enumerate(procs):
        if p.exitcode != 0:
            log = (tmp_path / f"rank{rank}.log").read_text(errors="replace")
            pytest.fail(f"rank {rank} exited with {p.exitcode}:\n{log[-3000:]}")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def single_process(n: int, method: str, layers: int = 3, sparsity=0.5, **config):
    model = tiny_model("llama", num_hidden_layers=layers)
    report = wandapp.prune(model, calib_ids(n, 16), sparsity=sparsity, method=method, progress=False, **config)
    return model, report


def mask_bits_differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    assert a.keys() == b.keys()
    return sum(int((a[k] != b[k]).sum()) for k in a)


def assert_ranks_agree(results: list[dict]) -> None:
    """Every rank ends with the same masks, weights and block errors, bit for bit."""
    first = results[0]
    for other in results[1:]:
        assert mask_bits_differing(first["masks"], other["masks"]) == 0
        for k, v in first["after"].items():
            assert torch.equal(v, other["after"][k]), f"rank {other['rank']}: {k}"
        # RO's decisions too: how many rounds and steps, its rate, and why its rounds ended.
        for key in ("mse_final", "ro_rolled_back", "ro_steps", "ro_stop", "ro_lr"):
            assert [b[key] for b in first["report"]["blocks"]] == [b[key] for b in other["report"]["blocks"]], key


@pytest.mark.parametrize(
    "method, config, worlds", [("wanda", {}, (2, 3)), ("rgs", {}, (2, 3)), ("sparsegpt", {}, (3,)), ("wanda", {"layer_sparsity": "owl"}, (2,))]
)
def test_statistics_summed_over_ranks_give_the_single_process_masks(tmp_path, method, config, worlds):
    # The reference is the single-process run (one rank: no process group) with the workers'
    # thread count, so that float results compare. 7 sequences: shares of 4 + 3 and 3 + 2 + 2.
    alone = run_ranks(tmp_path, 1, method=method, n=7, config=config)[0]
    assert alone["report"]["nsamples"] == 7
    for world in worlds:
        results = run_ranks(tmp_path, world, method=method, n=7, config=config)
        assert_ranks_agree(results)
        assert results[0]["report"]["nsamples"] == 7
        assert mask_bits_differing(results[0]["masks"], alone["masks"]) == 0, f"{world} ranks"
        for k, v in alone["after"].items():
            if method == "sparsegpt":  # its weight updates solve with a Hessian summed in another order
                torch.testing.assert_close(results[0]["after"][k], v, rtol=1e-4, atol=1e-6, msg=f"{world} ranks: {k}")
            else:  # the kept weights are the dense ones
                assert torch.equal(results[0]["after"][k], v), f"{world} ranks: {k}"
        got = [b["mse_final"] for b in results[0]["report"]["blocks"]]
        assert got == pytest.approx([b["mse_final"] for b in alone["report"]["blocks"]], rel=1e-5), f"{world} ranks"
        if config:  # OWL's plan comes from the dense statistics of every rank's sequences
            assert [b["target_sparsity"] for b in results[0]["report"]["blocks"]] == [b["target_sparsity"] for b in alone["report"]["blocks"]]


def test_wanda_plus_plus_with_a_fixed_ro_batch_matches_one_process_up_to_summation_order(tmp_path):
    # ro_batch_size fixed: every step averages the same sequences' gradients whatever the number of
    # ranks, so only float summation order differs.
    # A minimum improvement that some blocks' rounds miss: every rank stops them where one process does.
    config = dict(ro_batch_size=2, ro_samples=4, ro_holdout=2, ro_rounds=3, ro_min_improvement=0.05, ro_extrapolate=True)
    _, report = single_process(7, "wanda++", **config)
    assert {b.ro_stop for b in report.blocks} & {"converged", "rolled back"}, [b.ro_stop for b in report.blocks]
    for world in (2, 3):
        results = run_ranks(tmp_path, world, method="wanda++", n=7, config=config)
        assert_ranks_agree(results)
        assert results[0]["report"]["config"]["ro_batch_size"] == 2
        total = sum(m.numel() for m in report.masks.values())
        assert mask_bits_differing(results[0]["masks"], report.masks) <= 1e-4 * total, f"{world} ranks"
        got = [b["mse_final"] for b in results[0]["report"]["blocks"]]
        assert got == pytest.approx([b.mse_final for b in report.blocks], rel=1e-3), f"{world} ranks"
        assert [b["ro_stop"] for b in results[0]["report"]["blocks"]] == [b.ro_stop for b in report.blocks], f"{world} ranks"


def test_wanda_plus_plus_by_default_takes_one_sequence_per_rank_per_step(tmp_path):
    config = dict(ro_samples=4, ro_holdout=2, ro_rounds=2)
    results = run_ranks(tmp_path, 2, method="wanda++", n=6, config=config)
    assert_ranks_agree(results)
    assert results[0]["report"]["config"]["ro_batch_size"] == 2
    # The same run in one process with RO steps of two sequences: equal up to summation order.
    _, report = single_process(6, "wanda++", **config, ro_batch_size=2)
    got = [b["mse_final"] for b in results[0]["report"]["blocks"]]
    assert got == pytest.approx([b.mse_final for b in report.blocks], rel=1e-3)


def test_a_rank_that_fails_after_its_last_block_leaves_the_others_their_reports(tmp_path):
    """Every block is pruned on every rank when rank 1 fails: the others raise RankFailedError
    naming rank 1, with a report that says all their blocks are pruned (and they are)."""
    results = run_ranks(tmp_path, 2, method="wanda", n=4, fail={"rank": 1, "block": 0, "where": "after"})
    assert {r["rank"]: r["error"] for r in results} == {0: "RankFailedError", 1: "Injected"}
    other = next(r for r in results if r["rank"] == 0)
    assert other["failed_rank"] == 1 and "after this rank had finished every block (blocks 0..2 pruned)" in other["message"], other["message"]
    assert [b["status"] for b in other["report"]["blocks"]] == ["pruned"] * 3
    last = {k: v for k, v in other["after"].items() if k.startswith("model.layers.2.") and k.endswith("proj.weight")}
    assert last and all(float((v == 0).float().mean()) == 0.5 for v in last.values())  # the last block is pruned too


@pytest.mark.parametrize("where", ["capture", "forward", "ro"])
def test_a_rank_that_fails_stops_every_rank_with_its_block_restored(tmp_path, where):
    block = 1
    results = run_ranks(tmp_path, 3, method="wanda++", n=6, config=dict(ro_samples=3, ro_holdout=2, ro_rounds=1), fail={"rank": 1, "block": block, "where": where})
    for r in results:
        before, after = r["before"], r["after"]
        if r["rank"] == 1:
            assert r["error"] == ("Injected" if where == "capture" else "PruneError"), r.get("message")
        else:
            assert r["error"] == "RankFailedError" and r["failed_rank"] == 1, r.get("message")
            assert "rank 1" in r["message"]
        pruned = set() if where == "capture" else set(range(block))
        for k, v in before.items():
            inside = k.startswith("model.layers.") and int(k.split(".")[2]) in pruned
            if not inside:
                assert torch.equal(after[k], v), f"rank {r['rank']}: {k} changed"
        if where != "capture":
            statuses = [b["status"] for b in r["report"]["blocks"]]
            assert statuses == ["pruned"] * block + ["restored"] + ["untouched"] * (3 - block - 1), f"rank {r['rank']}: {statuses}"


def test_blocks_offloaded_by_accelerate_on_every_rank(tmp_path):
    pytest.importorskip("accelerate")
    alone = run_ranks(tmp_path, 1, method="wanda", n=5)[0]
    results = run_ranks(tmp_path, 2, method="wanda", n=5, offload=True)
    assert_ranks_agree(results)
    assert mask_bits_differing(results[0]["masks"], alone["masks"]) == 0
    for k, v in alone["after"].items():
        assert torch.equal(results[0]["after"][k], v), k


def checkpoint_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, name)))
    return tensors


def checkpoint_run(tmp_path) -> tuple:
    """(the one-process wanda checkpoint of a tiny model saved in tmp_path/src, the ranks'
    destination, their run_ranks spec)."""
    src, alone, dst = tmp_path / "src", tmp_path / "alone", tmp_path / "dst"
    tiny_model("llama", num_hidden_layers=3).save_pretrained(src)
    wandapp.prune_checkpoint(src, alone, calib_ids(7, 16), sparsity=0.5, method="wanda", progress=False)
    return alone, dst, dict(method="wanda", n=7, checkpoint={"src": str(src), "dst": str(dst)})


def assert_same_checkpoint(got_folder, expected_folder) -> None:
    got, expected = checkpoint_tensors(got_folder), checkpoint_tensors(expected_folder)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_checkpoint_streamed_by_ranks_equals_one_process_and_resumes(tmp_path):
    alone, dst, spec = checkpoint_run(tmp_path)
    # Rank 1 fails as block 1 starts: every rank stops; block 0 stays recorded.
    results = run_ranks(tmp_path, 2, **spec, fail={"rank": 1, "block": 1, "where": "core"})
    assert [r["error"] for r in results] == ["RankFailedError", "PruneError"], [r.get("message") for r in results]
    assert "rank 1" in results[0]["message"] and "resumes at block 1" in results[0]["message"]
    state = json.load(open(dst / ".wandapp-run" / "state.json"))
    assert state["blocks_done"] == 1
    # Every rank must see the record (one shared folder), and a resume needs the same number of
    # ranks; then it finishes where it stopped.
    elsewhere = dict(spec, checkpoint=dict(spec["checkpoint"], own_dst_rank=1, own_dst=str(tmp_path / "elsewhere")))
    results = run_ranks(tmp_path, 2, **elsewhere)
    assert all(r["error"] == "InvalidArgumentError" and "every rank sees" in r["message"] for r in results), results
    assert all(r["error"] == "ResumeMismatchError" for r in run_ranks(tmp_path, 3, **spec))
    results = run_ranks(tmp_path, 2, **spec)
    assert all("error" not in r for r in results), [r.get("message") for r in results]
    assert [b["status"] for b in results[0]["report"]["blocks"]] == ["pruned"] * 3
    assert_same_checkpoint(dst, alone)
    ranks_masks, alone_masks = wandapp.load_masks(str(dst / "masks")), wandapp.load_masks(str(alone / "masks"))
    assert ranks_masks.keys() == alone_masks.keys() and all(torch.equal(ranks_masks[k], alone_masks[k]) for k in alone_masks)
    assert os.listdir(dst / ".wandapp-run") == ["state.json"]


def test_a_rank_that_fails_after_prune_checkpoint_wrote_leaves_the_others_a_complete_checkpoint(tmp_path):
    """Rank 1 fails once the checkpoint is written: rank 0 raises RankFailedError with its report
    (every block pruned), the destination holds the one-process checkpoint and records the run as
    finished, so the same call returns the recorded report without pruning again."""
    alone, dst, spec = checkpoint_run(tmp_path)
    results = run_ranks(tmp_path, 2, **spec, fail={"rank": 1, "block": 0, "where": "after"})
    assert [r["error"] for r in results] == ["RankFailedError", "Injected"], [r.get("message") for r in results]
    assert results[0]["failed_rank"] == 1, results[0]["message"]
    assert "after this rank had finished every block (blocks 0..2 pruned)" in results[0]["message"], results[0]["message"]
    assert [b["status"] for b in results[0]["report"]["blocks"]] == ["pruned"] * 3
    assert_same_checkpoint(dst, alone)
    assert json.load(open(dst / ".wandapp-run" / "state.json"))["finished"]
    again = run_ranks(tmp_path, 2, **spec)
    assert all("error" not in r for r in again), [r.get("message") for r in again]
    assert again[0]["report"] == results[0]["report"]


def test_ranks_with_other_data_or_too_few_sequences_are_refused_on_every_rank(tmp_path):
    for other in (dict(other_data_rank=1), dict(other_weights_rank=1)):
        results = run_ranks(tmp_path, 2, method="wanda", n=4, **other)
        assert all(r["error"] == "InvalidArgumentError" and "different" in r["message"] for r in results), other
        assert all(torch.equal(r["after"][k], v) for r in results for k, v in r["before"].items())
    results = run_ranks(tmp_path, 3, method="wanda", n=2)
    assert all(r["error"] == "CalibrationError" and "3 processes" in r["message"] for r in results)


def test_ranks_with_other_settings_are_refused_before_any_change(tmp_path):
    results = run_ranks(tmp_path, 2, method="wanda++", n=4, config=dict(ro_samples=2, ro_holdout=2, ro_rounds=2), other_config_rank=1, other_config={"ro_rounds": 1})
    assert all(r["error"] == "InvalidArgumentError" and "different models, calibration data or settings" in r["message"] for r in results)
    assert all(torch.equal(r["after"][k], v) for r in results for k, v in r["before"].items())


def test_a_rank_that_fails_before_prune_inside_guarded_stops_the_others(tmp_path):
    """The user's own step before prune (loading, say), inside wandapp.distributed.guarded: the
    other ranks raise RankFailedError naming it instead of waiting in their first collective."""
    results = run_ranks(tmp_path, 3, method="wanda", n=6, fail_before_prune_rank=1)
    assert results[1]["error"] == "RuntimeError"
    assert [(r["error"], r["failed_rank"]) for i, r in enumerate(results) if i != 1] == [("RankFailedError", 1)] * 2
    assert all(torch.equal(r["after"][k], v) for r in results for k, v in r["before"].items())


class _Sent:
    """What ``torch.distributed.all_reduce`` would send, recorded in one process: a Ctrl-C (SIGINT to
    this process) arrives while the first one, the failure flag, is on the wire."""

    def __init__(self):
        self.tensors: list[torch.Tensor] = []

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        if not self.tensors:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # a SIGINT not held back is raised here, between the flag and the data
        self.tensors.append(tensor.clone())
        return _Done() if async_op else None


class _Done:
    def wait(self):
        return True


@pytest.fixture
def ctrl_c_raises():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test: a process started in the
    background by a shell, as CI may run pytest, inherits SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _world_of_two(monkeypatch) -> "wandapp.distributed.World":
    """Rank 0 of two on gloo, as ``World`` sees it, with no process group behind it."""
    for name, value in (("get_rank", 0), ("get_world_size", 2), ("get_backend", "gloo")):
        monkeypatch.setattr(wandapp.distributed.dist, name, lambda group=None, value=value: value)
    return wandapp.distributed.World()


def test_ctrl_c_during_the_failure_check_lands_after_the_data_it_announces(monkeypatch, ctrl_c_raises):
    """The documented hold-back, in one process and deterministically: Ctrl-C during the flag's
    collective is raised only once the data collective the flag announced has been sent, so the
    other ranks never receive a failure flag where they expect data (or data where they expect a
    flag). Fails if `_uninterrupted` is removed from `World.all_reduce`."""
    sent = _Sent()
    monkeypatch.setattr(wandapp.distributed.dist, "all_reduce", sent.all_reduce)
    data = torch.arange(3.0)
    with pytest.raises(KeyboardInterrupt):
        _world_of_two(monkeypatch).all_reduce([data])
    assert [t.tolist() for t in sent.tensors] == [[0], [0.0, 1.0, 2.0]]  # the flag (no failure), then the data


def test_ctrl_c_inside_guard_tells_the_other_ranks_once_and_then_stops_this_one(monkeypatch, ctrl_c_raises):
    """A KeyboardInterrupt inside ``World.guard`` is a failure the others hear of (flag 1 + this
    rank) before it propagates; the flag is sent whole although Ctrl-C arrives during it."""
    sent = _Sent()
    monkeypatch.setattr(wandapp.distributed.dist, "all_reduce", sent.all_reduce)
    world = _world_of_two(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        with world.guard():
            raise KeyboardInterrupt
    # The guard's failure flag went out (value rank + 1 = 1); the Ctrl-C sent during it came after.
    assert [t.tolist() for t in sent.tensors] == [[1]] and world.stopped
