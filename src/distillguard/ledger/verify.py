"""Walking a ledger and its checkpoints: every way stored data can be tampered with.

:func:`verify_ledger` reads the entries in index order once and checks, per entry, that
the stored leaf hash is the hash of the stored leaf, that the leaf names the index it is
stored at, that the look-up columns agree with the leaf, and that a retained body still
has the hash its leaf commits to (a deleted body is fine: that is redaction). It rebuilds
the Merkle tree from the leaves as stored and compares it with every checkpoint (the
stored ones and any the auditor brings), whose signatures it checks with the public key.

What each problem means, and the entry it names as the first bad one:

* ``modified``: a leaf whose stored hash, columns or retained body disagree with it;
* ``deleted``: indices missing from the sequence (or cut off the end, below a checkpoint);
* ``reordered``: an entry stored at another index than the one its leaf names;
* ``inserted``: an entry whose index is already taken by the leaf of another (the later
  entries were renumbered to make room);
* ``checkpoint-signature``: a checkpoint whose signature does not verify, signed by a
  retired key for a tree larger than the key's retirement size, or whose stored size or
  root differ from the ones its signed note holds;
* ``checkpoint-unknown-key``: a checkpoint signed by a key that is neither current nor
  retired: it cannot be checked (not evidence of tampering by itself, but not verified);
* ``checkpoint-mismatch``: a checkpoint whose root differs from the tree rebuilt from the
  stored entries. An attacker who rewrote an entry *and* its stored hash is caught here;
  the bad entry lies between the last matching checkpoint and this one, and is named
  (``modified``) when leaf hashes from a verified export are passed as ``reference``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from distillguard.ledger import merkle
from distillguard.ledger.checkpoint import CheckpointError, VerifierKey
from distillguard.ledger.keyring import KeyRing, UnknownKeyError, as_ring
from distillguard.ledger.store import LedgerStore, open_store
from distillguard.ledger.tree import MerkleTree

MAX_PROBLEMS = 100
RANGE = 100_000  # entries per worker task
PARALLEL_MIN = 200_000  # smaller ledgers are checked in this process
UNKNOWN_KEY = "checkpoint-unknown-key"


@dataclass(slots=True)
class Problem:
    kind: str
    index: int | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "index": self.index, "message": self.message}


@dataclass
class Report:
    entries: int = 0
    checkpoints: int = 0
    checkpoints_matched: int = 0
    covered: int = 0
    redacted_bodies: int = 0
    problems: list[Problem] = field(default_factory=list)
    more_problems: int = 0
    # checkpoints that verified with a retired key: key (name+id) -> [retired at, count]
    retired_signers: dict[str, list[int]] = field(default_factory=dict)
    kinds: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def tampered(self) -> bool:
        """A problem other than checkpoints that could not be checked (unknown key)."""
        return bool(self.kinds - {UNKNOWN_KEY})

    @property
    def verdict(self) -> str:
        """``ok``; ``tampered``; or ``unverified``: the only problems are checkpoints
        signed by a key not given, so they were not checked."""
        return "ok" if self.ok else "tampered" if self.tampered else "unverified"

    @property
    def first_bad(self) -> int | None:
        found = [p.index for p in self.problems if p.index is not None]
        return min(found) if found else None

    def add(self, kind: str, index: int | None, message: str) -> None:
        self.kinds.add(kind)
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(Problem(kind, index, message))
        else:
            self.more_problems += 1

    def to_json(self) -> dict[str, Any]:
        first = self.first_bad
        out: dict[str, Any] = {
            "ok": self.ok, "verdict": self.verdict, "entries": self.entries, "checkpoints": self.checkpoints,
            "checkpoints_matched": self.checkpoints_matched,
            "covered_by_checkpoint": self.covered,
            "uncovered": max(0, self.entries - self.covered),
            "redacted_bodies": self.redacted_bodies,
            "problems": [p.to_json() for p in self.problems],
            "signed_by_retired_key": [
                {"key": key, "retired_at_size": size, "checkpoints": count}
                for key, (size, count) in self.retired_signers.items()],
        }
        if self.more_problems:
            out["more_problems"] = self.more_problems
        if first is not None:
            out["first_bad"] = first
            out["first_bad_problem"] = next(p.to_json() for p in self.problems
                                            if p.index == first)
        return out


@dataclass
class RangeResult:
    """What checking the stored rows with ``lo <= idx < hi`` found (see
    :func:`check_range`); the Merkle tree and checkpoints are checked by the caller."""

    entries: int = 0
    redacted: int = 0
    hashes: list[bytes] = field(default_factory=list)
    positions: list[tuple[int, int]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def check_range(rows: Iterable[tuple[Any, ...]], lo: int, hi: int) -> RangeResult:
    """Per-entry checks of stored rows (``COLUMNS`` order, by idx) meant to fill
    ``[lo, hi)``: leaf hash, index named by the leaf, look-up columns, retained bodies.
    ``positions`` lists gaps ``(idx, -1)`` and entries stored elsewhere than the index
    their leaf names ``(idx, named)``."""
    out = RangeResult()
    problems = out.problems
    hashes = out.hashes
    positions = out.positions
    sha256 = hashlib.sha256
    loads = orjson.loads
    expected = lo
    for idx, kind, entry_id, ts, account_id, leaf_raw, stored_hash, request, response in rows:
        out.entries += 1
        if not (type(leaf_raw) is bytes and type(stored_hash) is bytes
                and (request is None or type(request) is bytes)
                and (response is None or type(response) is bytes)):
            # The store writes bytes; SQLite keeps whatever type an UPDATE puts there
            # (replace() on a BLOB gives TEXT), and hashing text raised TypeError.
            problems.append(Problem("modified", idx, f"entry {idx}: "
                                    + _not_bytes(leaf=leaf_raw, leaf_hash=stored_hash,
                                                 request=request, response=response)))
            leaf_raw, stored_hash, request, response = (
                _as_bytes(leaf_raw), _as_bytes(stored_hash),
                None if request is None else _as_bytes(request),
                None if response is None else _as_bytes(response))
        if idx != expected:
            if idx > expected:
                positions.append((expected, -1))
            expected = idx
        expected += 1
        h = sha256(b"\x00" + leaf_raw).digest()
        hashes.append(h)
        if h != stored_hash:
            problems.append(Problem("modified", idx, f"entry {idx}: the stored leaf does not "
                                                     "match its stored hash"))
        try:
            leaf = loads(leaf_raw)
            named = leaf["idx"]
            if not isinstance(named, int):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            problems.append(Problem("modified", idx, f"entry {idx}: the leaf is not a "
                                                     "ledger entry"))
            continue
        if named != idx:
            positions.append((idx, named))
        if (leaf.get("id") != entry_id or leaf.get("kind") != kind or leaf.get("ts") != ts
                or leaf.get("account_id") != account_id):
            problems.append(Problem("modified", idx, f"entry {idx}: stored columns differ "
                                                     "from the leaf"))
        if kind == "exchange":
            if request is not None:
                if sha256(request).hexdigest() != leaf.get("request_sha256"):
                    problems.append(_bad_body(idx, "request"))
            elif leaf.get("request_sha256") is not None:
                out.redacted += 1
            if response is not None:
                if sha256(response).hexdigest() != leaf.get("response_sha256"):
                    problems.append(_bad_body(idx, "response"))
            elif leaf.get("response_sha256") is not None:
                out.redacted += 1
    if expected < hi:
        positions.append((expected, -1))
    return out


def _as_bytes(value: Any) -> bytes:
    """A stored column as the bytes it would have held (text as UTF-8)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return str(value).encode("utf-8", "surrogatepass")


def _not_bytes(**columns: Any) -> str:
    wrong = [f"{name} is stored as {type(value).__name__}" for name, value in columns.items()
             if value is not None and type(value) is not bytes]
    if columns["leaf"] is None or columns["leaf_hash"] is None:
        wrong.insert(0, "leaf or leaf_hash is missing")
    return ", ".join(wrong) + ", not bytes"


def _bad_body(idx: int, name: str) -> Problem:
    return Problem("modified", idx, f"entry {idx}: the stored {name} body does not match "
                                    "the hash its leaf commits to")


def _check_stored_range(location: str, lo: int, hi: int) -> RangeResult:
    """Worker process: open the store by its location and check one range."""
    store = open_store(location)
    try:
        return check_range(store.iter_tuples(lo, hi), max(lo, 0), hi)
    finally:
        store.close()


def _bounds(top: int, stored: int) -> list[tuple[int, int]]:
    """The index ranges to read: ``RANGE`` indices each up to one range past the number
    of rows ``stored``, then one range up to ``top`` (one past the largest index) for
    rows moved far beyond the others. A ledger's rows fill ``[0, stored)``; a row moved
    to index 2^62 would otherwise plan 4.6e13 ranges. The first range also takes rows
    moved to negative indices."""
    limit = min(top, stored + RANGE)
    bounds = [(lo, min(limit, lo + RANGE)) for lo in range(0, limit, RANGE)]
    if top > limit:
        bounds.append((limit, top))
    if bounds:
        bounds[0] = (-(2**62), bounds[0][1])
    return bounds


def _ranges(store: LedgerStore, workers: int) -> Iterator[RangeResult]:
    top, stored = store.size(), store.count()
    bounds = _bounds(top, stored)
    if workers <= 1 or stored < PARALLEL_MIN:
        for lo, hi in bounds:
            yield check_range(store.iter_tuples(lo, hi), max(lo, 0), hi)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(_check_stored_range, store.location, lo, hi)
                   for lo, hi in bounds]
        for fut in futures:
            yield fut.result()


def verify_ledger(store: LedgerStore, key: VerifierKey | KeyRing | None, *,
                  extra_checkpoints: Sequence[str] = (), workers: int | None = None,
                  reference: Mapping[int, bytes] | None = None,
                  labelled_checkpoints: Sequence[tuple[str, str]] = ()) -> Report:
    """Check a whole ledger; see the module docstring. Reads every entry once; large
    ledgers are read by ``workers`` processes (default: one per CPU), each a range.

    ``key`` is the public key checkpoints are checked with, or a
    :class:`~distillguard.ledger.keyring.KeyRing` of the current and retired keys (after
    a rotation of the signing key); each checkpoint is checked with the key its
    signature line names.

    ``reference`` maps leaf indices to leaf hashes known independently of the store (the
    rows of a Parquet export checked against its signed checkpoint,
    :func:`~distillguard.ledger.verifier.verified_rows`): an entry whose rebuilt leaf hash
    differs is ``modified`` even when its stored hash was rewritten to match, and one it
    holds beyond the stored entries is ``deleted``. ``labelled_checkpoints`` are more
    checkpoints kept elsewhere, each ``(label, note)`` (the label names it in problems):
    the signed checkpoints of those exports, for one."""
    report = Report()
    # -- checkpoints: signatures first; each valid one becomes a (size, root, label) target
    targets: dict[int, list[tuple[bytes, str]]] = {}
    stored = {f"checkpoint #{c.seq}": c for c in store.checkpoints()}
    notes = [(label, c.note) for label, c in stored.items()]
    notes += [(f"supplied checkpoint {i + 1}", n) for i, n in enumerate(extra_checkpoints)]
    notes += labelled_checkpoints
    report.checkpoints = len(notes)
    ring = None if key is None else as_ring(key)
    for label, note in notes:
        if ring is None:
            report.add("checkpoint-signature", None,
                       f"{label}: no public key to check its signature with")
            continue
        try:
            cp, signer = ring.open(note)
        except UnknownKeyError as exc:
            report.add(UNKNOWN_KEY, None, f"{label}: {exc}")
            continue
        except CheckpointError as exc:
            report.add("checkpoint-signature", None, f"{label}: {exc}")
            continue
        if signer.retired_at_size is not None:
            counted = report.retired_signers.setdefault(signer.describe(),
                                                        [signer.retired_at_size, 0])
            counted[1] += 1
        row = stored.get(label)
        if row is not None and (row.tree_size != cp.tree_size
                                or row.root_hash != cp.root_hash):
            # Only the signed note is trusted; the columns beside it are what look-ups
            # read, and a rewrite of them alone is still tampering.
            report.add("checkpoint-signature", None, f"{label}: its stored size or root "
                                                     "differ from its signed note")
        targets.setdefault(cp.tree_size, []).append((cp.root_hash, label))
    sizes = sorted(targets)
    mismatches: list[tuple[int, int, str]] = []
    if 0 in targets:
        _compare(mismatches, report, targets[0], merkle.EMPTY_ROOT, 0, 0)
    matched_upto = 0
    # -- entries, range by range, in stored order -----------------------------------------
    tree = MerkleTree()
    positions: list[tuple[int, int]] = []
    next_size = iter(s for s in sizes if s > 0)
    want = next(next_size, None)
    for part in _ranges(store, workers or os.cpu_count() or 1):
        report.entries += part.entries
        report.redacted_bodies += part.redacted
        positions += part.positions
        for problem in part.problems:
            report.add(problem.kind, problem.index, problem.message)
        if reference:
            _compare_reference(report, reference, tree.size, part.hashes)
        append = tree.append
        if want is None or tree.size + len(part.hashes) < want:
            for h in part.hashes:
                append(h)
            continue
        for h in part.hashes:
            append(h)
            while want is not None and tree.size == want:
                if _compare(mismatches, report, targets[want], tree.root(), want,
                            matched_upto):
                    matched_upto = want
                want = next(next_size, None)
    report.covered = min(max(sizes, default=0), report.entries)
    # -- checkpoints beyond the stored entries: entries cut off the end -------------------
    while want is not None:
        for _root, label in targets[want]:
            report.add("deleted", tree.size, f"{label} covers {want} entries but only "
                                             f"{tree.size} are stored")
        want = next(next_size, None)
    if reference and max(reference) >= tree.size:
        missing = min(i for i in reference if i >= tree.size)
        report.add("deleted", missing, f"entry {missing} is in an export verified against "
                                       f"a signed checkpoint, but only {tree.size} entries "
                                       "are stored")
    _classify(report, positions)
    _report_mismatches(report, mismatches)
    return report


def _compare_reference(report: Report, reference: Mapping[int, bytes], start: int,
                       hashes: list[bytes]) -> None:
    """Leaf ``start + i`` of the rebuilt tree against the independently known hash."""
    lo, hi = max(start, min(reference)), min(start + len(hashes), max(reference) + 1)
    for pos in range(lo, hi):
        want = reference.get(pos)
        if want is not None and want != hashes[pos - start]:
            report.add("modified", pos, f"entry {pos}: its leaf is not the one the export "
                                        "verified against a signed checkpoint holds")


def _compare(mismatches: list[tuple[int, int, str]], report: Report,
             expected: list[tuple[bytes, str]], root: bytes, size: int,
             matched_upto: int) -> bool:
    ok = True
    for want_root, label in expected:
        if want_root == root:
            report.checkpoints_matched += 1
        else:
            ok = False
            mismatches.append((matched_upto, size, label))
    return ok


def _report_mismatches(report: Report, mismatches: list[tuple[int, int, str]]) -> None:
    """A checkpoint that does not match is explained by the first entry problem in its
    range when there is one; otherwise the range is all the evidence there is."""
    local = sorted(p.index for p in report.problems if p.index is not None)
    for lo, size, label in mismatches:
        inside = [i for i in local if lo <= i < size]
        where = inside[0] if inside else lo
        report.add("checkpoint-mismatch", where,
                   f"{label} (size {size}) does not match the stored entries: an entry "
                   f"between index {lo} and {size - 1} was changed")


def _classify(report: Report, positions: list[tuple[int, int]]) -> None:
    """Name what happened where an entry is not at the index its leaf names."""
    named_elsewhere = {n for _, n in positions if n >= 0}
    done_inserted = False
    for idx, named in sorted(positions):
        if named == -1:  # a gap in stored indices starting at idx
            report.add("deleted", idx, f"entry {idx} is missing")
        elif named > idx:
            # entry idx still exists somewhere: stored in its place, or moved elsewhere
            if idx in named_elsewhere:
                report.add("reordered", idx, f"the entry stored at {idx} is entry {named}")
            else:
                report.add("deleted", idx, f"entry {idx} is missing (entry {named} was "
                                           f"moved into its place)")
        elif not done_inserted:
            report.add("inserted", named, f"an entry was inserted at {named}: entry "
                                          f"{named} is now stored at {idx}")
            done_inserted = True
