"""The dashboard's demo step: check the pages render and say where to open them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import httpx

from distillguard.serve import StackThread


def step(stack: StackThread, folder: Path, context: dict[str, Any]) -> None:
    settings = context["settings"]
    base = stack.stack.admin_url + "/dashboard"
    with httpx.Client(base_url=base, timeout=30) as client:
        form = client.get("/login").text
        found = re.search(r'name="login_token" value="([^"]+)"', form)
        if found is None:
            click.echo("dashboard: not enabled")
            return
        r = client.post("/login", data={"token": settings.admin.token,
                                        "login_token": found.group(1)})
        client.headers["cookie"] = "dg_session=" + (r.cookies.get("dg_session") or "")
        page = client.get("/?range=1h")
        count = re.search(r'<span class="n">([\d,]+)</span><span class="l">requests', page.text)
    click.echo(f"dashboard: {base}/  (log in with admin.token from "
               f"{folder}/distillguard.yaml)")
    if count:
        click.echo(f"dashboard overview: {count.group(1)} requests in the last hour of traffic")
