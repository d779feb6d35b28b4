"""Every turnout error carries the HTTP status it implies, so the admin API and the CLI map them in one place."""

from __future__ import annotations

from dataclasses import dataclass


class TurnoutError(Exception):
    status_hint = 500


@dataclass(frozen=True, slots=True)
class FieldError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ValidationError(TurnoutError):
    """A document or request body was refused; nothing was changed."""

    status_hint = 422

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


# State-changing operations
class ConflictError(TurnoutError):
    """The change contradicts the current state (a referenced version, an immutable spec)."""

    status_hint = 409


class NotFoundError(TurnoutError):
    status_hint = 404


class StaleRevisionError(TurnoutError):
    """Compare-and-swap lost: the state moved on since the caller read it."""

    status_hint = 412

    def __init__(self, expected: int, current: int) -> None:
        self.expected = expected
        self.current = current
        super().__init__(f"revision is {current}, not {expected}: read the state again and retry")


# Store availability
class StoreUnavailableError(TurnoutError):
    """The store cannot be reached; no change was made anywhere."""

    status_hint = 503
