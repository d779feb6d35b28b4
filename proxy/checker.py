"""The field-path error collector every validator uses: route files, API bodies, the static configuration.

Design rule: a validator walks the whole document and records every error with its field path
(`routes[0].split.v3: ...`) instead of stopping at the first; nothing here knows what the fields mean.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from proxy.errors import FieldError, ValidationError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class Checker:
    """Collects field errors while a document is walked."""

    def __init__(self) -> None:
        self.errors: list[FieldError] = []

    def fail(self, path: str, message: str) -> None:
        self.errors.append(FieldError(path, message))

    def raise_if_any(self) -> None:
        if self.errors:
            raise ValidationError(self.errors)

    def mapping(self, value: object, path: str, allowed: set[str] | None = None) -> dict[str, Any] | None:
        if not isinstance(value, Mapping):
            self.fail(path, f"expected a mapping, got {kind_of(value)}")
            return None
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                self.fail(path, f"keys must be strings, got {kind_of(k)} {k!r}")
                continue
            if allowed is not None and k not in allowed:
                self.fail(join_path(path, k), f"unknown field (expected one of: {', '.join(sorted(allowed))})")
                continue
            out[k] = v
        return out

    def string(self, value: object, path: str, pattern: re.Pattern[str] | None = None,
               what: str = "a string") -> str | None:
        if not isinstance(value, str) or not value:
            self.fail(path, f"expected {what}, got {kind_of(value)}")
            return None
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(path, f"expected {what}, got {value!r}")
            return None
        return value

    def boolean(self, value: object, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.fail(path, f"expected true or false, got {kind_of(value)}")
            return None
        return value

    def number(self, value: object, path: str, minimum: float, maximum: float | None = None,
               integer: bool = False) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
            self.fail(path, f"expected {'an integer' if integer else 'a number'}, got {kind_of(value)}")
            return None
        if not math.isfinite(value) or value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum:g}" if maximum is None else f"between {minimum:g} and {maximum:g}"
            self.fail(path, f"expected a number {bound}, got {value!r}")
            return None
        return value

    def string_list(self, value: object, path: str, single_ok: bool = False) -> tuple[str, ...] | None:
        if single_ok and isinstance(value, str):
            return tuple(value.split())
        if not isinstance(value, list):
            self.fail(path, f"expected a list of strings, got {kind_of(value)}")
            return None
        out = []
        for i, item in enumerate(value):
            s = self.string(item, f"{path}[{i}]")
            if s is not None:
                out.append(s)
        return tuple(out)

    def string_pairs(self, value: object, path: str, key_re: re.Pattern[str] | None = None,
                     lower_keys: bool = False) -> tuple[tuple[str, str], ...] | None:
        m = self.mapping(value, path)
        if m is None:
            return None
        out = []
        for k, v in m.items():
            if key_re is not None and not key_re.fullmatch(k):
                self.fail(join_path(path, k), "invalid name")
                continue
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                self.fail(join_path(path, k), f"expected a string, got {kind_of(v)}")
                continue
            out.append((k.lower() if lower_keys else k, str(v)))
        return tuple(out)


def kind_of(value: object) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)


def join_path(path: str, key: str) -> str:
    if NAME_RE.fullmatch(key) or TOKEN_RE.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"
