"""The report's canonical form and its JSON Schema (REPORT.md §3-4).

* :data:`GROUPS` lists every top-level field: its group (1-10), its visibility (``P`` public and
  rendered, ``M`` machine-only: in the public JSON, not rendered) and its JSON type. Restricted
  (``R``) values never enter the document: they go to the annex.
* :func:`json_schema` generates the draft 2020-12 schema from it (each property carries
  ``x-group`` and ``x-visibility``); ``reports/schema/report-v1.json`` is that output, shipped, and a
  test checks that it is current.
* :func:`canonical_bytes` is the one serialisation: UTF-8, sorted keys, round-trip floats, no NaN,
  ±∞ as the strings "inf"/"-inf"; ``report_sha256`` is the SHA-256 of those bytes without it.
* :func:`validate` collects every problem and raises once, each naming the field's JSON pointer.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from jsonschema import Draft202012Validator

__all__ = [
    "GROUPS",
    "SCHEMA_PATH",
    "SCHEMA_VERSION",
    "canonical_bytes",
    "json_schema",
    "seal_report",
    "validate",
]

SCHEMA_VERSION = "1.0.0"
SCHEMA_PATH = Path(__file__).parent / "schema" / "report-v1.json"

_OBJ, _STR = {"type": "object"}, {"type": "string"}
_NUM = {"oneOf": [{"type": "number"}, {"enum": ["inf", "-inf"]}]}
_PER_MECH = {"type": "object", "minProperties": 1, "additionalProperties": {"type": "object"}}
_PER_MECH_TEXT = {"type": "object", "minProperties": 1, "additionalProperties": {"type": "string"}}

#: name -> (group, visibility, schema of the value, required keys inside it)
GROUPS: dict[str, tuple[int, str, dict, tuple[str, ...]]] = {
    "schema_version": (1, "P", {"type": "string", "pattern": r"^1\.\d+\.\d+$"}, ()),
    "report_id": (1, "P", {"type": "string", "pattern": "^[0-9a-f]{16}$"}, ()),
    "created": (1, "P", _STR, ()),
    "report_sha256": (1, "M", {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}, ()),
    "identity": (1, "P", _OBJ, ("corpus", "stage_hashes", "versions", "inputs", "owner")),
    "data": (2, "P", _OBJ, ("units", "partition_key", "n_members", "users")),
    "statements": (3, "P", _PER_MECH_TEXT, ()),
    "mechanisms": (4, "P", _PER_MECH, ()),
    "accounting": (5, "P", _PER_MECH, ()),
    "composition": (5, "P", _STR, ()),
    "budget": (6, "P", _PER_MECH, ()),
    "ledgers": (7, "P", _PER_MECH, ()),
    "audit": (8, "P", _OBJ, ("attached",)),
    "utility": (8, "P", _OBJ, ("perplexity", "epsilon")),
    "implementation": (9, "P", _OBJ, ("rng", "floating_point", "side_channels")),
    "governance": (10, "P", _OBJ, ("nist_sp_800_226", "sign_off")),
    "figures": (8, "M", _OBJ, ()),
    "verdict": (10, "P", _OBJ, ("level", "rules", "policy")),
    "annex": (10, "M", _OBJ, ("file", "sha256")),
}
#: Fields inside per-mechanism groups that must be present for every mechanism.
_MECH_REQUIRED = {
    "mechanisms": ("kind", "relation", "certified"),
    "accounting": ("epsilon", "delta", "accountant", "conversion", "cross_checks", "profile"),
    "budget": ("epsilon", "delta", "burn_down", "at_exhaustion"),
    "ledgers": ("file", "verified", "head", "file_sha256", "recompute_command"),
}


def json_schema() -> dict:
    """The draft 2020-12 JSON Schema of the report document."""
    props = {}
    for name, (group, vis, schema, required) in GROUPS.items():
        prop = {**schema, "x-group": group, "x-visibility": vis}
        if required:
            prop["required"] = list(required)
        if name in _MECH_REQUIRED:
            prop["additionalProperties"] = {
                "type": "object",
                "required": list(_MECH_REQUIRED[name]),
            }
        props[name] = prop
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:pmixed-audit:report:v1",
        "title": "pmixed-audit compliance report",
        "type": "object",
        "properties": props,
        "required": [n for n in GROUPS if n != "report_sha256"] + ["report_sha256"],
        "additionalProperties": False,
        "$defs": {"number_or_inf": _NUM},
    }


def _check_finite(x: object, at: str, problems: list[str]) -> None:
    if isinstance(x, float) and not math.isfinite(x):
        problems.append(f"{at or '/'}: {x} is not allowed (write 'inf' or '-inf', never NaN)")
    elif isinstance(x, dict):
        for k, v in x.items():
            _check_finite(v, f"{at}/{k}", problems)
    elif isinstance(x, list):
        for i, v in enumerate(x):
            _check_finite(v, f"{at}/{i}", problems)


def validate(doc: dict) -> None:
    """Raises ValueError listing every problem, each as ``/json/pointer: message``."""
    problems: list[str] = []
    _check_finite(doc, "", problems)
    validator = Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        pointer = "/" + "/".join(str(p) for p in err.absolute_path)
        message = err.message if len(err.message) <= 160 else err.message[:157] + "..."
        problems.append(f"{pointer}: {message}")
    if problems:
        raise ValueError("report does not match the schema: " + "; ".join(problems))


def canonical_bytes(doc: dict) -> bytes:
    """UTF-8, sorted keys, round-trip floats; NaN and ±∞ floats are refused."""
    return (
        json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    ).encode()


def seal_report(doc: dict) -> dict:
    """``doc`` with ``report_sha256`` over its canonical bytes without that field."""
    body = {k: v for k, v in doc.items() if k != "report_sha256"}
    return {**body, "report_sha256": "sha256:" + hashlib.sha256(canonical_bytes(body)).hexdigest()}
