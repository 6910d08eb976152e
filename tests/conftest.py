"""Shared fixtures. The tiny random LLaMA comes from wandapp's own pytest plugin
(wandapp.testing); this adds the other families and calibration ids."""

from __future__ import annotations

import os
import re
import shutil
import tempfile

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_config(family: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    base = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    base.update(overrides)
    if family == "llama":
        return LlamaConfig(**base)
    if family == "llama3":  # LLaMA 3.1-style rope scaling
        return LlamaConfig(**base, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if family == "mistral":
        return MistralConfig(**base)
    if family == "qwen2":
        return Qwen2Config(**base)
    if family == "qwen2-sliding":  # block 0 full attention, later blocks a sliding window of 8
        return Qwen2Config(**base, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).to(dtype).eval()


ARCH_BASE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

#: model_type -> config overrides of a tiny random model (README: supported models). Dense first.
ARCHITECTURES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma2": {},
    "gemma3_text": dict(sliding_window=8),
    "phi3": {},
    "olmo2": {},
    "granite": {},
    "mixtral": MOE,
    "qwen2_moe": dict(MOE, shared_expert_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3_moe": dict(MOE, decoder_sparse_step=1, mlp_only_layers=[]),
    "olmoe": MOE,
    "gpt_oss": MOE,
}
MOE_TYPES = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"}


def available(model_type: str) -> bool:
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def tiny_architecture(model_type: str, seed: int = 0, **overrides):
    """A tiny random model of ``model_type`` (ARCHITECTURES), skipped where transformers lacks it."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    if not available(model_type):
        pytest.skip(f"transformers {__import__('transformers').__version__} has no {model_type}")
    torch.manual_seed(seed)
    config = CONFIG_MAPPING[model_type](**{**ARCH_BASE, **ARCHITECTURES[model_type], **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


def calib_ids(n: int = 16, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def ids() -> torch.Tensor:
    return calib_ids()


#: Folders that torch (compile cache, torchrun's logs) and pytest (the basetemp of a pytest run in a
#: subprocess) keep in the temporary folder by design.
KEPT_BY_DESIGN = ("torchinductor_", "torchelastic_", "pytest-of-")


@pytest.fixture(scope="session", autouse=True)
def temporary_folder(tmp_path_factory):
    """The session's temporary folder (TMPDIR, inherited by the subprocesses tests start), empty
    at the start of each test: a test whose code leaves files there fails (a quickstart notebook
    that left its saved model behind once filled CI's disk). pytest's own folders stay where they were."""
    tmp_path_factory.getbasetemp()
    folder = tempfile.mkdtemp(prefix="wandapp-tests-")
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"], tempfile.tempdir = folder, None
    yield folder
    if saved is None:
        del os.environ["TMPDIR"]
    else:
        os.environ["TMPDIR"] = saved
    tempfile.tempdir = None
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def leaves_no_temporary_files(temporary_folder):
    yield
    left = sorted(name for name in os.listdir(temporary_folder) if not name.startswith(KEPT_BY_DESIGN))
    for name in left:  # so that the next test starts clean
        path = os.path.join(temporary_folder, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    assert not left, f"the test left {left} in the temporary folder"


#: The skips a CI run accepts: a pattern of the skip's reason -> why it is expected. CI installs
#: every optional dependency and architecture wandapp supports, so any other skip there is a fault
#: (a missing install, a test that silently stopped testing) and fails the run (WANDAPP_ALLOW_SKIPS=1
#: lifts that; outside CI skips are reported only).
EXPECTED_SKIPS = {
    r"^no CUDA device": "CI has no GPU; bench/gpu.py runs these on the GPU machine",
    r"^needs the checkout's editable build and a wandapp installed for another torch":
        "runs in the older torches' venvs (make test-older-torches), not in the editable one",
}


def _skip_reason(report) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


def unexpected_skips(reports) -> list[tuple[str, str]]:
    """(test id, reason) of each skip that EXPECTED_SKIPS does not explain."""
    found = [(r.nodeid, _skip_reason(r)) for r in reports]
    return [(node, reason) for node, reason in found if not any(re.search(p, reason) for p in EXPECTED_SKIPS)]


def _enforced() -> bool:
    return bool(os.environ.get("CI")) and not os.environ.get("WANDAPP_ALLOW_SKIPS")


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not _enforced():
        return
    if unexpected_skips(reporter.stats.get("skipped", [])) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    unexpected = unexpected_skips(terminalreporter.stats.get("skipped", []))
    if not unexpected:
        return
    verdict = "these fail a CI run" if _enforced() else "a CI run fails on these"
    terminalreporter.section(f"unexpected skips ({verdict}; tests/conftest.py EXPECTED_SKIPS)", red=_enforced())
    for node, reason in unexpected:
        terminalreporter.line(f"{node}: {reason}")
