"""Why a call is refused: one exception type carrying a gRPC status, and its client-side forms.

Every refusal names the RPC and the rule that refused it. Messages are written here or by
the engine from names only (RPC, rule, identifier kind, field names): never from a value
taken from a message, a token or an exception raised while evaluating.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from telemetry_guard.policy import Denial, access

_LOG = logging.getLogger("telemetry_guard.errors")

# Rules named by refusals that do not come from the policy file itself.
RULE_PROTOCOL = access.RULE_PROTOCOL  # the stream protocol (GATEWAY.md): metadata first and only once
RULE_WIRE = "wire"  # a request that is not a valid message of the RPC's request type
RULE_EVALUATION = "evaluation"  # the policy could not be evaluated


class GuardError(Exception):
    """A call refused by telemetry-guard: a status code, the rule and the message the caller gets.

    The message names the RPC and the rule, except where the gateway's own answer is given (its
    exact message, or an opaque one for credentials): then `reason` says why, for the audit log only.
    """

    def __init__(self, code: grpc.StatusCode, rule: str, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.rule = rule
        self.message = message
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    @classmethod
    def from_denial(cls, denial: Denial) -> GuardError:
        return cls(denial.code, denial.rule, denial.message, denial.reason)

    def as_rpc_error(self) -> GuardRpcError:
        """The form a sync channel raises: a grpc.RpcError that is also a grpc.Call."""
        return GuardRpcError(self)

    def as_aio_rpc_error(self) -> grpc.aio.AioRpcError:
        """The form an aio channel raises."""
        return grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(), self.message)


def protocol_error(rpc: str, what: str) -> GuardError:
    return GuardError(grpc.StatusCode.INVALID_ARGUMENT, RULE_PROTOCOL, f"{rpc}: {what} (rule {RULE_PROTOCOL})")


def wire_error(rpc: str) -> GuardError:
    return GuardError(
        grpc.StatusCode.INVALID_ARGUMENT,
        RULE_WIRE,
        f"{rpc}: request is not a valid {rpc} request message (rule {RULE_WIRE})",
    )


def internal_error(rpc: str, exc: BaseException) -> GuardError:
    """The policy could not be evaluated. Only the exception's type is kept: its text may quote data."""
    _LOG.error("%s: policy evaluation failed with %s; the call is refused", rpc, type(exc).__name__)
    return GuardError(
        grpc.StatusCode.INTERNAL,
        RULE_EVALUATION,
        f"{rpc}: the policy could not be evaluated ({type(exc).__name__}); the call is refused "
        f"(rule {RULE_EVALUATION})",
    )


class GuardRpcError(grpc.RpcError, grpc.Call):
    """A refusal raised by a sync client interceptor; the call never left the process."""

    def __init__(self, error: GuardError) -> None:
        super().__init__(error.message)
        self.error = error

    def __str__(self) -> str:
        return f"<GuardRpcError {self.error.code.name}: {self.error.message}>"

    def code(self) -> grpc.StatusCode:
        return self.error.code

    def details(self) -> str:
        return self.error.message

    def initial_metadata(self) -> tuple[()]:
        return ()

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], Any]) -> bool:
        return False
