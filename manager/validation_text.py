"""FastAPI's and pydantic's validation errors as one line (the API's own refusals and
the CLI's rendering of them share it; nothing heavy is imported here)."""

from __future__ import annotations

from typing import Any

# How pydantic names the members of a union in an error's location: not the user's words.
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})
_UNION_TAG_PREFIXES = ("function-after[", "list[", "union[", "constrained-", "dict[")


def one_line(errors: Any, skip: int = 0) -> str:
    """Pydantic/FastAPI validation errors as one line, ``where: what; ...``, one message
    per place (a union's members each fail on the same value)."""
    seen: dict[str, str] = {}
    for error in errors if isinstance(errors, list) else []:
        if not isinstance(error, dict):
            continue
        where = ".".join(str(p) for p in list(error.get("loc", ()))[skip:]
                         if str(p) not in _UNION_TAGS
                         and not str(p).startswith(_UNION_TAG_PREFIXES))
        message = " ".join(str(error.get("msg", "invalid")).split())
        seen.setdefault(where, message.removeprefix("Value error, "))
    return "; ".join(f"{where}: {message}" if where else message
                     for where, message in seen.items()) or "invalid request"
