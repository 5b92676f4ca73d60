"""The ``dashboard`` settings section, validated when the gateway starts."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from distillguard.config import validate_section


class DashboardSettings(BaseModel):
    """Options of the analyst dashboard (``dashboard:`` in the settings file)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # Signs the session cookie. Unset: derived from the admin token, so every replica
    # that shares the admin token accepts the same sessions, and rotating the admin
    # token ends every session.
    session_secret: str | None = Field(None, min_length=16)
    session_max_age_s: int = Field(8 * 3600, gt=0)
    # A session not used for this long ends (whatever session_max_age_s says).
    session_idle_s: int = Field(30 * 60, gt=0)
    # Secure cookies need HTTPS, or a loopback address (browsers treat 127.0.0.1 and
    # localhost as secure). Switch off only behind a TLS-terminating proxy that speaks
    # plain HTTP to the admin port on another host.
    cookie_secure: bool = True
    page_size: int = Field(50, ge=5, le=500)
    # Failed log-ins allowed per client address per minute.
    login_attempts_per_minute: int = Field(10, ge=1)
    # A verdicts document (the public format) to show when the detection store is absent.
    verdicts_path: str | None = None

    def signing_key(self, admin_token: str) -> bytes:
        base = self.session_secret or admin_token
        return hmac.new(base.encode(), b"distillguard-dashboard-session|" +
                        hashlib.sha256(admin_token.encode()).digest(), "sha256").digest()


def parse_dashboard_settings(raw: Any) -> DashboardSettings:
    return validate_section(DashboardSettings, raw, "dashboard")
