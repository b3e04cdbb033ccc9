"""Protocol-neutral errors of the serving path; each API maps a ``Code`` to its own (gRPC status,
HTTP status), so both reject the same inputs with the same messages."""

from __future__ import annotations

import enum


class Code(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    UNAUTHENTICATED = "unauthenticated"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"


DRAINING = "the server is draining for shutdown; retry on another server"


class ServingError(Exception):
    def __init__(self, code: Code, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    def with_message(self, message: str) -> ServingError:
        """The same error told differently (e.g. naming the field as the client sent it)."""
        return ServingError(self.code, message, self.retry_after_s)


def invalid(message: str) -> ServingError:
    return ServingError(Code.INVALID_ARGUMENT, message)
