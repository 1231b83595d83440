"""Domain exceptions. The API layer maps each one to a gRPC status code in one place."""

from __future__ import annotations


class AllocsvcError(Exception):
    """Base class of every domain error."""


class InvalidRequest(AllocsvcError):
    """Bad input (INVALID_ARGUMENT); `field` names the offending request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class NotFound(AllocsvcError):
    """An id that does not exist (NOT_FOUND)."""


class FailedPrecondition(AllocsvcError):
    """The operation is not allowed in the current state (FAILED_PRECONDITION)."""


class ResourceExhausted(AllocsvcError):
    """Overload or a quota exceeded (RESOURCE_EXHAUSTED)."""


class Unavailable(AllocsvcError):
    """A store is down and no safe answer exists (UNAVAILABLE)."""


class AlreadyExists(AllocsvcError):
    """An id that is taken already (ALREADY_EXISTS)."""
