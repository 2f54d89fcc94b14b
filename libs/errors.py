"""Domain errors: what went wrong, in terms the caller can act on.

Domain modules raise these and import no gRPC; :mod:`libs.grpc_errors` maps
them to ``google.rpc.Status`` with details at the servicer boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class TollgateError(Exception):
    """Base class of errors that map to a typed gRPC status."""

    # ErrorInfo.reason: a stable, machine-readable UPPER_SNAKE_CASE code.
    reason: str = "ERROR"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason
        self.metadata = metadata or {}


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidArgument(TollgateError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation], message: str | None = None):
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(message or f"invalid request: {summary}")
        self.violations = violations


class Unauthenticated(TollgateError):
    reason = "UNAUTHENTICATED"


class PermissionDenied(TollgateError):
    reason = "PERMISSION_DENIED"


class NotFound(TollgateError):
    reason = "NOT_FOUND"


class AlreadyExists(TollgateError):
    reason = "ALREADY_EXISTS"


class FailedPrecondition(TollgateError):
    reason = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class QuotaViolation:
    subject: str
    description: str


class QuotaExceeded(TollgateError):
    """A limit or budget is exhausted; ``retry_after_s`` says when it frees up."""

    reason = "QUOTA_EXCEEDED"

    def __init__(self, message: str, violations: list[QuotaViolation], retry_after_s: float):
        super().__init__(message)
        self.violations = violations
        self.retry_after_s = retry_after_s


class Overloaded(TollgateError):
    """The service is shedding load; retry later (RESOURCE_EXHAUSTED + RetryInfo)."""

    reason = "OVERLOADED"

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(TollgateError):
    """A backend is down or unreachable; the call may succeed later."""

    reason = "UNAVAILABLE"

    def __init__(self, message: str, *, retry_after_s: float | None = None, reason: str | None = None,
                 metadata: dict[str, str] | None = None):
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(TollgateError):
    reason = "DEADLINE_EXCEEDED"


@dataclass
class Violations:
    """Collects field violations while validating a request."""

    items: list[FieldViolation] = field(default_factory=list)

    def add(self, field_path: str, description: str) -> None:
        self.items.append(FieldViolation(field_path, description))

    def check(self, ok: bool, field_path: str, description: str) -> None:
        if not ok:
            self.add(field_path, description)

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)
