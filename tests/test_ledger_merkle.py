"""RFC 9162 hashing and proofs against published test vectors, and on random trees.

The vectors are the RFC 6962 reference leaves used by Certificate Transparency and the
proofs published in transparency-dev/merkle's ``testdata`` (inclusion/1-4 and
consistency/1-4 "happy path" cases).
"""

from __future__ import annotations

import base64
import os
import random

import pytest

from distillguard.ledger import merkle
from distillguard.ledger.tree import CHUNK, MerkleTree

LEAVES = [bytes.fromhex(x) for x in [
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
    "606162636465666768696a6b6c6d6e6f"]]
ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
INCLUSION = [  # (leaf index, tree size, proof)
    (0, 8, ["lqKW0iTyhcZ77pPDD4owkVfw2qNdxbh+QQt4YwoJz8c=",
            "Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
            "a0eq8p7jwq+a+Im8H7klTavTEXfxYjLdaqsDXKOb9uQ="]),
    (5, 8, ["vBoGQ7EuTS18d5GPROD095qDi2z57FtcKD4fTYhZnms=",
            "yoVOoSjtBQtBs1/8G4e46yveRh6eO1WW7Oa51ZdaCuA=",
            "037kGJdt2VdTwcc4Yrk5j6Kiz5tP8P3+izDNlSCWFLc="]),
    (2, 3, ["+sVCA+fMaWzw38tCySodnbr3CtnmIfS9jZhmLwDjwSU="]),
    (1, 5, ["bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=",
            "Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
            "vBoGQ7EuTS18d5GPROD095qDi2z57FtcKD4fTYhZnms="]),
]
CONSISTENCY = [  # (old size, new size, proof)
    (1, 8, ["lqKW0iTyhcZ77pPDD4owkVfw2qNdxbh+QQt4YwoJz8c=",
            "Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
            "a0eq8p7jwq+a+Im8H7klTavTEXfxYjLdaqsDXKOb9uQ="]),
    (6, 8, ["DrxdNDf74tsVi58Sah0RjjCBgQMdCpSfje3t68VY72o=",
            "yoVOoSjtBQtBs1/8G4e46yveRh6eO1WW7Oa51ZdaCuA=",
            "037kGJdt2VdTwcc4Yrk5j6Kiz5tP8P3+izDNlSCWFLc="]),
    (2, 5, ["Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
            "vBoGQ7EuTS18d5GPROD095qDi2z57FtcKD4fTYhZnms="]),
    (6, 7, ["DrxdNDf74tsVi58Sah0RjjCBgQMdCpSfje3t68VY72o=",
            "sIaT7C5yFZcTBkHoIR5+7cy0wmQTlj7ubB4u0W/7Gl8=",
            "037kGJdt2VdTwcc4Yrk5j6Kiz5tP8P3+izDNlSCWFLc="]),
]
HASHES = [merkle.leaf_hash(x) for x in LEAVES]


def _b(values: list[str]) -> list[bytes]:
    return [base64.b64decode(v) for v in values]


def _tree(hashes: list[bytes]) -> MerkleTree:
    tree = MerkleTree(lambda lo, hi: hashes[lo:hi])
    tree.extend(hashes)
    return tree


def test_roots_match_reference_values() -> None:
    assert merkle.root_of([]).hex() == \
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    tree = MerkleTree()
    for n, (h, want) in enumerate(zip(HASHES, ROOTS, strict=True), start=1):
        tree.append(h)
        assert tree.root().hex() == want == merkle.root_of(HASHES[:n]).hex()


@pytest.mark.parametrize("index,size,proof", INCLUSION)
def test_inclusion_vectors(index: int, size: int, proof: list[str]) -> None:
    path = _b(proof)
    tree = _tree(HASHES)
    assert tree.inclusion(index, size) == path
    root = bytes.fromhex(ROOTS[size - 1])
    merkle.verify_inclusion(index, size, HASHES[index], path, root)
    bad = [
        (index, size, b"WrongLeaf", path),
        (index ^ 1, size, HASHES[index], path),
        (index, size * 2, HASHES[index], path),
        (index, size, HASHES[index], path[:-1]),
        (index, size, HASHES[index], [*path, root]),
        (index, size, HASHES[index], [bytes([path[0][0] ^ 8]) + path[0][1:], *path[1:]]),
    ]
    for i, n, leaf, p in bad:
        with pytest.raises(merkle.ProofError):
            merkle.verify_inclusion(i, n, leaf, p, root)


@pytest.mark.parametrize("old,new,proof", CONSISTENCY)
def test_consistency_vectors(old: int, new: int, proof: list[str]) -> None:
    path = _b(proof)
    tree = _tree(HASHES)
    assert tree.consistency(old, new) == path
    r1, r2 = bytes.fromhex(ROOTS[old - 1]), bytes.fromhex(ROOTS[new - 1])
    merkle.verify_consistency(old, new, r1, r2, path)
    for args in [(old, new, r2, r1, path), (old, new, r1, r2, path[:-1]),
                 (old, new, r1, r2, [*path, r2]), (old + 1, new, r1, r2, path),
                 (old, new, r1, r2, [path[0][::-1], *path[1:]])]:
        with pytest.raises(merkle.ProofError):
            merkle.verify_consistency(*args)


def test_edge_cases() -> None:
    merkle.verify_consistency(0, 5, merkle.EMPTY_ROOT, bytes.fromhex(ROOTS[4]), [])
    merkle.verify_consistency(4, 4, bytes.fromhex(ROOTS[3]), bytes.fromhex(ROOTS[3]), [])
    with pytest.raises(merkle.ProofError):
        merkle.verify_consistency(4, 4, bytes.fromhex(ROOTS[3]), bytes.fromhex(ROOTS[2]), [])
    with pytest.raises(merkle.ProofError):
        merkle.verify_inclusion(8, 8, HASHES[0], [], bytes.fromhex(ROOTS[7]))
    with pytest.raises(merkle.ProofError):
        _tree(HASHES).inclusion(0, 9)


@pytest.mark.parametrize("size", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 77, 1100])
def test_random_trees_against_the_definition(size: int) -> None:
    rng = random.Random(size)
    hashes = [merkle.leaf_hash(os.urandom(12)) for _ in range(size)]
    fetched: list[int] = []

    def fetch(lo: int, hi: int) -> list[bytes]:
        fetched.append(lo)
        return hashes[lo:hi]

    tree = MerkleTree(fetch)
    tree.extend(hashes)
    sizes = sorted({1, size, rng.randint(1, size), rng.randint(1, size)})
    for n in sizes:
        root = merkle.root_of(hashes[:n])
        assert tree.root(n) == root
        for i in rng.sample(range(n), min(n, 12)):
            merkle.verify_inclusion(i, n, hashes[i], tree.inclusion(i, n), root)
        for m in rng.sample(range(n + 1), min(n + 1, 12)):
            proof = tree.consistency(m, n)
            merkle.verify_consistency(m, n, merkle.root_of(hashes[:m]), root, proof)
            if m not in (0, n) and proof:
                with pytest.raises(merkle.ProofError):
                    merkle.verify_consistency(m, n, merkle.root_of(hashes[:m]),
                                              hashes[0], proof)
    if size > CHUNK:
        assert fetched  # complete chunks are read back from the store, not kept
