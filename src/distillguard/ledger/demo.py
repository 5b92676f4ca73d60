"""The ledger's step of ``distillguard demo``: a checkpoint, a proof checked with only
the public key, and a full verification of what the demo traffic left in the ledger."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click
import orjson

from distillguard.gateway.adminpaths import id_segment
from distillguard.ledger.checkpoint import VerifierKey
from distillguard.ledger.verifier import verify_inclusion_bundle
from distillguard.ledger.verify import verify_ledger
from distillguard.ledger.writer import writer_for
from distillguard.serve import StackThread


def step(stack: StackThread, folder: Path, context: dict[str, Any]) -> None:
    admin = context["admin"]
    checkpoint = admin.post("/admin/v1/ledger/checkpoint").json()
    click.echo(f"signed checkpoint: {checkpoint['tree_size']} entries, root "
               f"{checkpoint['root_hash'][:16]}...")
    key = VerifierKey.parse(admin.get("/admin/v1/ledger/key").text)
    (folder / "ledger.pub").write_text(key.encode() + "\n")
    last = admin.get(f"/admin/v1/ledger/entries/{checkpoint['tree_size'] - 1}").json()
    ref = last["entry"].get("exchange_id") or last["entry"].get("id")
    proof = admin.get(f"/admin/v1/ledger/proof/{id_segment(ref)}").json()
    (folder / "proof.json").write_bytes(orjson.dumps(proof, option=orjson.OPT_INDENT_2))
    verify_inclusion_bundle(proof, key)
    click.echo(f"inclusion proof of {ref} (leaf {proof['leaf_index']}, "
               f"{len(proof['path'])} hashes) checks out with the public key alone")
    writer = writer_for(context["settings"])
    ledger = writer.ledger
    if ledger is not None:
        report = stack.call(asyncio.to_thread(verify_ledger, ledger.store, key))
        click.echo(f"full verification: {'ok' if report.ok else 'FAILED'}, "
                   f"{report.entries} entries, {report.checkpoints_matched} checkpoint(s) "
                   "matched")
    click.echo(f"check it yourself: distillguard ledger verify-proof {folder}/proof.json "
               f"--key {folder}/ledger.pub")
