"""Progress of the tokenizing phase for the whole job, shown by rank 0.

On a terminal: a tqdm bar in bytes (MB/s, ETA) with documents/s beside it; otherwise (batch logs) one
plain line every `interval_s` seconds. Every other rank sends its running totals to rank 0 at most
every half second (a small non-blocking message), and a last one when its part is done, whatever
happened: rank 0 collects them all before it goes on, so no message is left in flight.
"""
from __future__ import annotations

import sys
import time
from typing import Dict

from data_prep.mpi import Group

_TAG = 0x6470  # "dp"
_SEND_EVERY_S = 0.5


class Progress:
    def __init__(self, group: Group, total_bytes: int, enabled: bool = True, interval_s: float = 30.0,
                 label: str = "tokenize"):
        self.group, self.total, self.label = group, max(int(total_bytes), 1), label
        self.enabled, self.interval_s = enabled, interval_s
        self.nbytes = self.docs = 0
        self._ranks: Dict[int, tuple] = {}  # rank -> (bytes, docs, done)
        self._requests = []
        self._last_send = 0.0
        self._start = self._last_line = time.monotonic()
        self._bar = None
        self._shown = (-1, -1)
        if enabled and group.is_root and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, unit="B", unit_scale=True, desc=label, file=sys.stderr,
                             dynamic_ncols=True)

    def update(self, nbytes: int, docs: int) -> None:
        """This rank finished `nbytes` of input holding `docs` documents."""
        self.nbytes += nbytes
        self.docs += docs
        if self.group.is_root:
            self.poll()
        elif self.group.comm is not None and time.monotonic() - self._last_send >= _SEND_EVERY_S:
            self._send(done=False)

    def _send(self, done: bool) -> None:
        self._last_send = time.monotonic()
        self._requests.append(self.group.comm.isend((self.nbytes, self.docs, done), dest=0, tag=_TAG))

    def poll(self) -> None:
        """Rank 0: take in the other ranks' totals and show the job's."""
        comm = self.group.comm
        if comm is not None:
            from mpi4py import MPI

            status = MPI.Status()
            while comm.iprobe(source=MPI.ANY_SOURCE, tag=_TAG, status=status):
                source = status.Get_source()
                self._ranks[source] = comm.recv(source=source, tag=_TAG)
        self._show()

    def _totals(self) -> tuple:
        nbytes = self.nbytes + sum(r[0] for r in self._ranks.values())
        docs = self.docs + sum(r[1] for r in self._ranks.values())
        return nbytes, docs

    def _show(self, final: bool = False) -> None:
        if not self.enabled:
            return
        nbytes, docs = self._totals()
        elapsed = max(time.monotonic() - self._start, 1e-9)
        if self._bar is not None:
            self._bar.update(nbytes - self._bar.n)
            self._bar.set_postfix_str(f"{docs / elapsed:,.0f} docs/s", refresh=False)
            return
        now = time.monotonic()
        if (final and (nbytes, docs) != self._shown) or now - self._last_line >= self.interval_s:
            self._last_line, self._shown = now, (nbytes, docs)
            rate = nbytes / elapsed
            eta = (self.total - nbytes) / rate if rate > 0 else float("inf")
            print(f"  {self.label}: {nbytes / self.total:5.1%} of {self.total / 1e6:,.1f} MB, {docs:,} docs, "
                  f"{rate / 1e6:.1f} MB/s, {docs / elapsed:,.0f} docs/s, ETA {eta:,.0f} s", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        """Every rank calls it after its part (also after an error): rank 0 waits for every rank's last word."""
        comm = self.group.comm
        if comm is not None and not self.group.is_root:
            from mpi4py import MPI

            self._send(done=True)
            MPI.Request.waitall(self._requests)
            return
        while comm is not None and sum(1 for r in self._ranks.values() if r[2]) < self.group.size - 1:
            time.sleep(0.05)
            self.poll()
        self._show(final=True)
        if self._bar is not None:
            self._bar.close()

