"""Checking a partner's STIX 2.1 content before anything of it is stored.

:func:`parse_bundle` (a bundle file) and :func:`check_objects` (a TAXII envelope's
objects) refuse, with one clear message: content over ``sharing.max_bundle_bytes``, bytes
that are not JSON, a document that is not a STIX bundle, a STIX 2.0 bundle or objects of
another ``spec_version``, object types STIX 2.1 does not define (custom object types
included), objects the ``stix2`` library rejects (missing or malformed properties,
invalid patterns, patterns nested too deeply for the parser), objects without an
``id`` or the ``created`` / ``modified`` STIX 2.1 requires (``stix2`` fills them in on its
copy), text holding the NUL character (which PostgreSQL cannot store: the
import failed with a traceback there) and objects nested more than MAX_JSON_DEPTH levels
(they are stored as JSON that orjson writes, at most 254 levels). Nothing is stored
unless everything passes.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any, TypeGuard

import orjson
import stix2
import stix2.exceptions

from distillguard.errors import DistillguardError
from distillguard.exchange import MAX_JSON_DEPTH, nested_deeper_than

SDO = {"attack-pattern", "campaign", "course-of-action", "grouping", "identity", "incident",
       "indicator", "infrastructure", "intrusion-set", "location", "malware",
       "malware-analysis", "note", "observed-data", "opinion", "report", "threat-actor",
       "tool", "vulnerability"}
SRO = {"relationship", "sighting"}
SCO = {"artifact", "autonomous-system", "directory", "domain-name", "email-addr",
       "email-message", "file", "ipv4-addr", "ipv6-addr", "mac-addr", "mutex",
       "network-traffic", "process", "software", "url", "user-account",
       "windows-registry-key", "x509-certificate"}
META = {"marking-definition", "language-content", "extension-definition"}
KNOWN_TYPES = SDO | SRO | SCO | META
# Properties STIX 2.1 requires that stix2.parse fills in when they are missing (a random
# id, the current time), on a copy: the object as sent still lacks them.
FILLED_IN = ("id", "created", "modified")
MAX_ERRORS_SHOWN = 5


class BundleError(DistillguardError):
    """Partner content that cannot be accepted; nothing of it was stored."""

    def __init__(self, message: str, *, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class ParsedBundle:
    bundle_id: str
    objects: list[dict[str, Any]]
    sha256: str
    size: int


def _load(raw: bytes, max_bytes: int, what: str) -> Any:
    if len(raw) > max_bytes:
        raise BundleError(f"the {what} is {len(raw)} bytes; the limit is {max_bytes} "
                          "(sharing.max_bundle_bytes)", status=413)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BundleError(f"the {what} is not valid JSON ({exc})", status=400) from None


def parse_bundle(raw: bytes, *, max_bytes: int) -> ParsedBundle:
    data = _load(raw, max_bytes, "bundle")
    if not isinstance(data, dict) or data.get("type") != "bundle":
        raise BundleError("not a STIX bundle: expected a JSON object with \"type\": \"bundle\"")
    if "spec_version" in data:
        raise BundleError(f"this is a STIX {data['spec_version']} bundle (it carries "
                          "spec_version); only STIX 2.1 is accepted")
    bundle_id = data.get("id")
    if not _is_bundle_id(bundle_id):
        raise BundleError("the bundle has no valid \"id\" (bundle--<uuid>)")
    objects = data.get("objects", [])
    if not isinstance(objects, list):
        raise BundleError("the bundle's \"objects\" is not a list")
    check_objects(objects)
    return ParsedBundle(bundle_id=bundle_id, objects=objects,
                        sha256=hashlib.sha256(raw).hexdigest(), size=len(raw))


def _is_bundle_id(value: Any) -> TypeGuard[str]:
    """A STIX identifier of a bundle: ``bundle--`` and a UUID (STIX 2.1, 2.9). Any text
    after ``bundle--`` was taken, and kept as a key of the bundles' provenance: one of
    thousands of characters was a database error on PostgreSQL."""
    if not isinstance(value, str) or not value.startswith("bundle--"):
        return False
    rest = value[len("bundle--"):]
    try:
        return str(uuid.UUID(rest)) == rest.lower()
    except ValueError:
        return False


def parse_envelope(raw: bytes, *, max_bytes: int) -> list[dict[str, Any]]:
    data = _load(raw, max_bytes, "envelope")
    if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
        raise BundleError("not a TAXII envelope: expected {\"objects\": [...]}")
    check_objects(data["objects"])
    return list(data["objects"])


def check_objects(objects: list[Any]) -> None:
    errors: list[str] = []
    for index, obj in enumerate(objects):
        problem = _check(obj)
        if problem:
            where = obj.get("id") if isinstance(obj, dict) and isinstance(
                obj.get("id"), str) else f"object {index}"
            errors.append(f"{where}: {problem}")
    if errors:
        more = len(errors) - MAX_ERRORS_SHOWN
        shown = "; ".join(errors[:MAX_ERRORS_SHOWN])
        raise BundleError(f"{len(errors)} invalid object(s): {shown}"
                          + (f" (and {more} more)" if more > 0 else ""))


def _check(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return "not a JSON object"
    kind = obj.get("type")
    if not isinstance(kind, str):
        return "no \"type\""
    if kind not in KNOWN_TYPES:
        return f"unknown object type {kind!r} (not defined by STIX 2.1)"
    if nested_deeper_than(obj):      # stored as JSON written by orjson (254 levels)
        return f"nests objects and arrays more than {MAX_JSON_DEPTH} levels deep"
    nul = _nul_at(obj, "")
    if nul is not None:
        where = nul or "a property name"
        return f"{where[:120]}{'…' if len(where) > 120 else ''} holds the NUL character"
    version = obj.get("spec_version")
    if version is None and kind not in SCO:
        return "no \"spec_version\" (STIX 2.1 objects carry \"spec_version\": \"2.1\")"
    if version is not None and version != "2.1":
        return f"spec_version {version!r}; only \"2.1\" is accepted"
    for name in _required(kind):
        if name not in obj:
            return f"no \"{name}\" (STIX 2.1 requires it of a {kind})"
    try:
        stix2.parse(obj, allow_custom=True, version="2.1")
    except (stix2.exceptions.STIXError, ValueError, TypeError) as exc:
        return str(exc).splitlines()[0][:300]
    except RecursionError:      # the pattern parser recurses once per parenthesis
        return "nested too deeply to be checked (a pattern's parentheses or operators)"
    return None


def _required(kind: str) -> tuple[str, ...]:
    """Of FILLED_IN, what STIX 2.1 requires of ``kind``: an id of every object, created
    and modified of SDOs and SROs, language-content and extension-definition; a
    marking-definition has no modified, an SCO neither."""
    if kind in SCO:
        return ("id",)
    if kind == "marking-definition":
        return ("id", "created")
    return FILLED_IN


def _nul_at(value: Any, path: str) -> str | None:
    """Where in ``value`` (a parsed JSON value at ``path``) a string or a property name
    holds the NUL character, or None. Iterative: JSON nested as deep as the parser
    allows (1,024) would exceed Python's recursion limit."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return where
        elif isinstance(item, dict):
            for key in reversed(item):     # first property first
                if "\x00" in key:
                    return where
                stack.append((item[key], f"{where}.{key}" if where else key))
        elif isinstance(item, list):
            stack.extend((item[i], f"{where}[{i}]") for i in reversed(range(len(item))))
    return None
