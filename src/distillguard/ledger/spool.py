"""Exchanges kept on the gateway's own disk while the ledger's store cannot be written.

The ledger records an exchange after its client has had the answer. When the store
cannot be written (PostgreSQL restarting, the network to it cut), the append failed and
the exchange was in no record at all: the access log silently missed what was served
while it was away, and the first exchanges after it came back (their connection was the
dead one). With a spool (``ledger.spool``, on by default) such entries are written to
files in ``<ledger.path>/spool/`` instead, synced to disk as the ledger's own durability
asks, and written to the store, oldest first, once it answers again; they then take the
next indices, so the tree stays one append-only log and verifies as before.

A *segment* is one JSON Lines file per spooled batch, written under a temporary name,
synced, then renamed: a segment is whole or absent. Each line holds an entry exactly as
it would have been stored: the canonical JSON of its leaf on either side of ``"idx"``
(:class:`~distillguard.ledger.entry.Pending`) and its retained bodies, so the leaf
written later is byte for byte the one that would have been written then.

Draining takes the segments in name order (time, then process and count; a process
never names a segment before one it wrote earlier, even when the clock steps back), each
under an exclusive ``flock`` (several processes may share the folder), appends its
entries in one transaction, and removes the segment. A segment another process is
draining ends the drain: the later ones wait for the next, rather than take indices
before it. A segment whose first entry the store already holds (a process died between
the commit and removing it) is left out entry by entry.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import orjson

from distillguard.ledger.entry import Pending

SUFFIX = ".jsonl"


def _record(p: Pending) -> bytes:
    if not p._head:
        p.encode()
    return orjson.dumps({
        "kind": p.kind, "entry_id": p.entry_id, "ts": p.ts, "account_id": p.account_id,
        "head": p._head.decode(), "tail": p._tail.decode(),
        "request": None if p.request is None else p.request.decode(),
        "response": None if p.response is None else p.response.decode(),
    })


def _pending(line: bytes) -> Pending:
    r = orjson.loads(line)
    return Pending(r["kind"], r["entry_id"], r["ts"], r["account_id"], {},
                   None if r["request"] is None else r["request"].encode(),
                   None if r["response"] is None else r["response"].encode(),
                   r["head"].encode(), r["tail"].encode())


class Spool:
    """The spool folder of one ledger; see the module docstring. ``sync`` fsyncs each
    segment and the folder (``ledger.durability: fsync``)."""

    def __init__(self, folder: Path, *, sync: bool = True) -> None:
        self.folder = folder
        self.sync = sync
        self._count = itertools.count()
        self._last_ns = 0     # the time in the last segment name this process chose
        # whether the last drain stopped at a segment another process was draining
        self.blocked = False
        self._remove_stale_parts()
        # entries this process spooled and not yet drained, plus what it found at start
        self.held = sum(self._lines(path) for path in self.segments())

    def usable(self) -> str | None:
        """Why segments could not be written here (None: they can): checked when the
        writer starts, since the first time it matters is when the store is away."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            return exc.strerror or str(exc)
        if not os.access(self.folder, os.W_OK | os.X_OK):
            return "not writable"
        return None

    def _remove_stale_parts(self) -> None:
        """Remove segments a process began and never finished (it died before the
        rename: nothing in them was acknowledged), once that process is gone."""
        try:
            parts = [e for e in os.scandir(self.folder) if e.name.endswith(".tmp")]
        except OSError:       # no folder yet, or none can be (said at start: usable)
            return
        for part in parts:
            try:
                pid = int(part.name.split("-")[1])
                os.kill(pid, 0)          # alive (or not ours to signal): still writing
            except ProcessLookupError:
                Path(part.path).unlink(missing_ok=True)
            except (ValueError, IndexError, PermissionError):
                continue

    @staticmethod
    def _lines(path: Path) -> int:
        try:
            with open(path, "rb") as fh:
                return sum(1 for line in fh if line.strip())
        except FileNotFoundError:
            return 0

    def segments(self) -> list[Path]:
        """The whole segments waiting, oldest first."""
        try:
            names = sorted(e.name for e in os.scandir(self.folder)
                           if e.name.endswith(SUFFIX) and e.is_file())
        except OSError:       # no folder yet, or none can be (said at start: usable)
            return []
        return [self.folder / name for name in names]

    def find(self, entry_id: str) -> Pending | None:
        """The waiting entry with this id, if a segment holds it (a scan of every
        segment: for looking one up while the store is away, not for bulk reads)."""
        needle = orjson.dumps(entry_id)
        for path in self.segments():
            try:
                with open(path, "rb") as fh:
                    for line in fh:
                        if needle in line:   # cheap test before the parse
                            pending = _pending(line)
                            if pending.entry_id == entry_id:
                                return pending
            except FileNotFoundError:        # written to the store meanwhile
                continue
        return None

    def add(self, entries: Sequence[Pending]) -> Path:
        """Write ``entries`` as one segment; returns once it is whole on disk (raises
        OSError when it cannot be: the disk is full, the folder cannot be made)."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        # names sort in the order segments are drained: after the ones written before,
        # even when the wall clock was set back in between
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        name = f"{self._last_ns:020d}-{os.getpid()}-{next(self._count):06d}{SUFFIX}"
        final = self.folder / name
        temporary = self.folder / f".{name}.tmp"
        data = b"".join(_record(p) + b"\n" for p in entries)
        try:
            with open(temporary, "wb") as fh:
                fh.write(data)
                fh.flush()
                if self.sync:
                    os.fsync(fh.fileno())
            os.rename(temporary, final)
            if self.sync:
                self._sync_folder()
        except OSError:
            temporary.unlink(missing_ok=True)
            raise
        self.held += len(entries)
        return final

    def _sync_folder(self) -> None:
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _locked(self) -> Iterator[tuple[Path, list[Pending]]]:
        """Each segment in order, with its entries, locked while the caller works on it,
        up to one another process is draining (:attr:`blocked`): a later segment
        appended meanwhile would take indices before that one's entries."""
        self.blocked = False
        for path in self.segments():
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self.blocked = True
                    return
                try:   # drained and removed by another process while we waited
                    if os.fstat(fd).st_ino != os.stat(path).st_ino:
                        continue
                except FileNotFoundError:
                    continue
                with open(path, "rb") as fh:
                    entries = [_pending(line) for line in fh if line.strip()]
                yield path, entries
            finally:
                os.close(fd)

    def drain(self, append: Callable[[list[Pending]], object],
              stored: Callable[[str], bool],
              committed: Callable[[int], None] | None = None) -> int:
        """Append every segment's entries (``append``: one transaction per segment),
        oldest first, leaving out those ``stored`` says the store holds; remove each
        segment once its entries are committed. Returns how many were appended. A
        failure of ``append`` is raised, and its segment and the later ones stay.
        ``committed`` is told, after each segment and before :attr:`held` drops, how
        many of its entries the store now holds (all of them: those appended and those
        a commit whose answer was lost had written already)."""
        appended = 0
        for path, entries in self._locked():
            # A segment is appended in one transaction, so it is in the store whole or
            # not at all: only a segment whose first entry is there needs each looked up.
            fresh = entries
            if entries and stored(entries[0].entry_id):
                fresh = [p for p in entries if not stored(p.entry_id)]
            if fresh:
                append(fresh)
            if committed is not None:
                committed(len(entries))
            path.unlink(missing_ok=True)
            if self.sync:
                self._sync_folder()
            appended += len(fresh)
            self.held = max(0, self.held - len(entries))
        # what is left on disk (segments another process is draining, or spooled by one
        # that shares the folder): the count is this process's only until then
        self.held = sum(self._lines(path) for path in self.segments())
        return appended
