"""wandapp.block: which dtype RO's training forwards are autocast to (``training_autocast``, the
``ro_autocast`` setting) and that ``BlockRunner.training_forward`` runs under it while ``forward``
does not."""

from __future__ import annotations

import pytest
import torch

from wandapp.block import BlockRunner, native_bfloat16, training_autocast

CPU = torch.device("cpu")


@pytest.fixture
def cpu_bfloat16(monkeypatch):
    """Sets what the CPU reports: (AVX512-BF16, AMX)."""

    def set_flags(avx512_bf16: bool, amx: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)

    return set_flags


@pytest.mark.parametrize("flags, native", [((False, False), False), ((True, False), True), ((False, True), True)])
def test_auto_autocasts_float32_weights_where_the_cpu_has_bfloat16_hardware(cpu_bfloat16, flags, native):
    cpu_bfloat16(*flags)
    assert native_bfloat16(CPU) is native
    assert training_autocast("auto", CPU, torch.float32) == (torch.bfloat16 if native else None)
    assert training_autocast("bfloat16", CPU, torch.float32) == torch.bfloat16  # asked for: whatever the CPU
    assert training_autocast("off", CPU, torch.float32) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_only_float32_weights_are_autocast(cpu_bfloat16, dtype):
    cpu_bfloat16(True, True)
    assert training_autocast("auto", CPU, dtype) is None
    assert training_autocast("bfloat16", CPU, dtype) is None


def test_auto_on_cuda_asks_for_bfloat16_without_emulation(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(including_emulation) or False)
    assert training_autocast("auto", torch.device("cuda"), torch.float32) is None
    assert asked == [False]
    assert not native_bfloat16(torch.device("meta"))


def test_training_forward_runs_under_autocast_and_forward_does_not():
    from conftest import calib_ids, tiny_model

    from wandapp.adapters import resolve
    from wandapp.capture import capture_first_block
    from wandapp.data import collect_sequences

    model = tiny_model("llama", seed=1)
    adapter = resolve(model)
    samples = capture_first_block(adapter, collect_sequences(calib_ids(n=2, seqlen=16), 2), CPU)
    dtypes = []
    hook = adapter.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    try:
        plain = BlockRunner(adapter, 0, samples, CPU)
        autocast = BlockRunner(adapter, 0, samples, CPU, autocast=torch.bfloat16)
        with torch.enable_grad():
            reference = plain.forward([0])
            trained = autocast.training_forward([0])
            measured = autocast.forward([0])
            unchanged = plain.training_forward([0])
    finally:
        hook.remove()
    assert dtypes == [torch.float32, torch.bfloat16, torch.float32, torch.float32]
    assert torch.equal(measured, reference) and torch.equal(unchanged, reference)
    assert trained.dtype == torch.float32 and not torch.equal(trained, reference)
    torch.testing.assert_close(trained, reference, rtol=0.05, atol=0.05)
