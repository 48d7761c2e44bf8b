"""What the database can store, checked once where data enters: every string of an event at the
inbox (``unstorable``), every text field of a snapshot or of a page of Clever's Data API as the
shapes read them (``tasks.roster.shapes.Text``: pydantic checks ``STORABLE_TEXT`` in Rust, fast
enough for a 100,000-student snapshot).

JSON can carry text PostgreSQL cannot hold (a NUL character: ``\\u0000``) and text UTF-8 cannot
encode (a lone surrogate: ``\\ud800`` without its pair). Either fails only when a statement sends
it, deep in a rule, as a ``DataError`` that no retry can fix. Found here, the input is refused or
rejected with the field that holds it named, never its value (it may be personal data).
"""

from __future__ import annotations

from typing import Any

from pydantic_core import ErrorDetails

# For pydantic's (Rust) validation of large inputs, as a string field's ``pattern``: matches text
# with no NUL. A lone surrogate fails any pattern (``string_unicode``): Rust text cannot hold one.
STORABLE_TEXT = r"^[^\x00]*$"
NUL = "contains a NUL character, which the database cannot store"
SURROGATE = "contains a lone surrogate (\\ud800-\\udfff), which UTF-8 cannot encode"


def _flaw(text: str) -> str | None:
    if "\x00" in text:
        return NUL
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return SURROGATE
    return None


def _step(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def unstorable(value: Any, path: str = "") -> str | None:
    """The first string (value or key) in ``value`` the database cannot store, as
    ``"<path>: <why>"`` (``data.object.name.first: contains a NUL character…``); None if every
    one can be stored. Walks iteratively: a deeply nested document is no recursion risk."""
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, str):
            flaw = _flaw(node)
            if flaw:
                return f"{where or 'the value'}: {flaw}"
        elif isinstance(node, dict):
            items = list(node.items())
            for key, child in reversed(items):
                key_text = str(key)
                if _flaw(key_text):
                    # The key itself cannot be shown: name where it sits.
                    return f"{where or 'the object'}: a key {_flaw(key_text)}"
                stack.append((_step(where, key_text), child))
        elif isinstance(node, list):
            stack.extend((_step(where, i), child) for i, child in reversed(list(enumerate(node))))
    return None


def explain(error: ErrorDetails) -> str:
    """A pydantic error's message, saying plainly when the value cannot be stored."""
    if error["type"] == "string_unicode":
        return SURROGATE
    if (
        error["type"] == "string_pattern_mismatch"
        and (error.get("ctx") or {}).get("pattern") == STORABLE_TEXT
    ):
        return NUL
    return error["msg"]
