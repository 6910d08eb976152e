"""Calibration spread over the processes of a ``torch.distributed`` group (torchrun, or a user's own
script that called ``init_process_group``).

Each rank captures and runs its own share of the calibration sequences (rank r holds sequences r,
r + W, r + 2W, ... of W ranks); the core adds up every sum over sequences (activation, gradient and
Hessian statistics, block errors, RO's gradients) through ``World.all_reduce`` before it decides
anything from them, so every rank takes the same decisions and ends with the same weights.

No rank ever waits for a collective that will not come: every collective wandapp makes is
preceded by a one-element MAX all-reduce of a failure flag. A rank that fails sends its flag once
(rank + 1) and makes no further collective; the others see it at their next collective and raise
``RankFailedError``. (A process killed outright sends nothing: torch's own process-group
timeout then ends the others' wait.)
"""

from __future__ import annotations

import hashlib
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from wandapp.errors import InvalidArgumentError, RankFailedError

#: The attribute that marks an exception the other ranks have been told about (``World.guard``).
_TOLD = "_wandapp_ranks_told"

#: (the default group, its World): one World per group, so nested guards share what was sent.
_current: tuple[object, World] | None = None


class World:
    """The ranks of ``group`` (None: the default group) as the core sees them: a share of the
    sequences per rank and a sum over ranks. Collectives run on the current CUDA device for NCCL
    and on the CPU otherwise; tensors elsewhere are copied there and back."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        #: True once this rank sent or saw a failure: it makes no further collective.
        self.stopped = False
        self._guards = 0  # guards open; the outermost starts with a clean slate

    @classmethod
    def current(cls) -> World | None:
        """The default process group when one is initialised with more than one rank, else None
        (the same World for the same group, so that nested guards share their state)."""
        global _current
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if _current is None or _current[0] is not dist.group.WORLD:
            _current = (dist.group.WORLD, cls())
        world = _current[1]
        return world if world.size > 1 else None

    def share(self, nsamples: int) -> list[int]:
        """The calibration sequences (indices into 0..nsamples) this rank runs."""
        return list(range(self.rank, nsamples, self.size))

    def all_reduce(self, tensors: list[torch.Tensor]) -> None:
        """Sums each tensor in place over the ranks (after the failure check)."""
        # Copies first: nothing that can fail runs between the flag and the data it announces.
        pairs = [(t, t if t.device == self.device else t.to(self.device)) for t in tensors]
        with _uninterrupted():
            self.check()
            for work in [dist.all_reduce(buf, group=self.group, async_op=True) for _, buf in pairs]:
                work.wait()
        for t, buf in pairs:
            if buf is not t:
                t.copy_(buf)

    def check(self) -> None:
        """The failure check every rank makes at the same point: raises RankFailedError when a
        rank failed since the last one."""
        if self.stopped:
            raise RuntimeError("wandapp: a collective after a rank failed; this is a bug in wandapp")
        with _uninterrupted():  # a Ctrl-C lands after the flag is read and recorded, never between
            failed = self._flag(0)
            self.stopped = bool(failed)
        if failed:
            raise RankFailedError(
                f"rank {failed - 1} of the {self.size} processes failed (its own error says why); rank {self.rank} stopped with it",
                rank=failed - 1,
            )

    def require_same(
        self, what: str, fingerprint: bytes, advice: str = "every rank must pass the same model, calibration data and settings"
    ) -> None:
        """InvalidArgumentError (``what`` differs; ``advice``) on every rank unless all ranks hold
        the same ``fingerprint``."""
        value = int.from_bytes(hashlib.sha256(fingerprint).digest()[:7], "little")
        both = torch.tensor([value, -value], dtype=torch.int64)
        self.all_reduce_max(both)
        if int(both[0]) != -int(both[1]):
            raise InvalidArgumentError(f"the {self.size} processes called wandapp with different {what}; {advice}")

    def all_reduce_max(self, t: torch.Tensor) -> None:
        """Replaces ``t`` in place by its element-wise maximum over the ranks (after the failure check)."""
        buf = t.to(self.device)
        with _uninterrupted():
            self.check()
            dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group)
        t.copy_(buf)

    def fail(self) -> None:
        """Tells the other ranks that this one failed, once; their next collective raises."""
        if self.stopped:
            return
        self.stopped = True
        try:
            self._flag(self.rank + 1)
        except Exception:  # the group itself broke (a peer died): nobody is waiting for the flag
            pass

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Any exception inside, on this rank, reaches the others (``fail``); on success every
        rank passes one last check together, so a rank that fails after its last collective still
        stops the others. Guards may nest (the CLI's around ``prune``'s): an exception that one
        guard has told the others about is marked, and an outer guard does not tell them again."""
        if self._guards == 0:
            self.stopped = False  # a new run (after a failed one, every rank starts again)
        self._guards += 1
        try:
            try:
                yield
            except BaseException as err:
                with _uninterrupted():
                    if not getattr(err, _TOLD, False):
                        self.fail()
                        setattr(err, _TOLD, True)
                raise
            # The last check (a failure it reports was already sent); a Ctrl-C after it is this
            # rank's alone: the others may have left.
            with _uninterrupted():
                self.check()
        finally:
            self._guards -= 1

    def _flag(self, value: int) -> int:
        flag = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())


@contextmanager
def _uninterrupted() -> Iterator[None]:
    """Ctrl-C (SIGINT) held back until the end, in the main thread: between a failure check and
    the data collective it announces, a KeyboardInterrupt would make this rank send its failure
    flag where the others send data. The Python handler is swapped for one that only records the
    signal, then the signal is raised again under the handler that was there. (Blocking SIGINT
    with ``pthread_sigmask`` does not hold it back: the kernel hands a Ctrl-C to any thread that
    does not block it, torch's worker threads included, and Python then raises it in the main
    thread all the same.)"""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) in (None, signal.SIG_DFL, signal.SIG_IGN):
        # Another thread cannot set handlers; None is a handler installed outside Python (kept);
        # SIG_DFL and SIG_IGN raise nothing in Python (and SIG_DFL still ends a hung collective).
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)


@dataclass(frozen=True)
class Share:
    """The calibration sequences a process runs: all ``nsamples`` without a ``world``, else the
    rank's share (``World.share``)."""

    world: World | None
    nsamples: int

    @property
    def indices(self) -> list[int]:
        return list(range(self.nsamples)) if self.world is None else self.world.share(self.nsamples)


@contextmanager
def guarded(world: World | None) -> Iterator[None]:
    """``world.guard()``, or nothing for a single process."""
    if world is None:
        yield
    else:
        with world.guard():
            yield
