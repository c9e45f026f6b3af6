"""The compiled policy: immutable, validated, with no YAML left in it.

Every setting remembers the policy key it came from (its `rule`), so that a decision
record, a denial or an audit report can name the exact line a reviewer signed off.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Generic, Literal, TypeVar

from telemetry_guard.policy.markers import sourcegraph_marker

T = TypeVar("T")

PrivateMode = Literal["keep", "drop", "allowlist"]
# A non-string value of an allowlisted key: removed, replaced by the policy's string, or by Sourcegraph's marker.
NonString = Literal["drop", "replace", "sourcegraph-marker"]


@dataclass(frozen=True, slots=True)
class Setting(Generic[T]):
    """A resolved value and the policy key that decided it (e.g. kinds.workspace.marketing_tracking)."""

    value: T
    rule: str


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an allowlist entry was written."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class AllowlistEntry:
    feature: str
    action: str  # "*" = any action of the feature
    keys: frozenset[str]
    reason: str
    origin: Origin
    approved_by: str = ""


@dataclass(frozen=True)
class Allowlist:
    """Event types whose private_metadata may (partly) leave. Lookup: exact, then feature + '*'."""

    entries: Mapping[tuple[str, str], AllowlistEntry] = field(default_factory=lambda: MappingProxyType({}))
    files: tuple[str, ...] = ()

    def lookup(self, feature: str, action: str) -> AllowlistEntry | None:
        return self.entries.get((feature, action)) or self.entries.get((feature, "*"))

    def __len__(self) -> int:
        return len(self.entries)


@dataclass(frozen=True, slots=True)
class FeatureFilter:
    """Whole-event filter: pass when an include pattern matches and no exclude pattern does."""

    include: tuple[str, ...]
    exclude: tuple[str, ...]
    rule: str

    @staticmethod
    def _matches(pattern: str, feature: str) -> bool:
        if pattern.endswith("*"):
            return feature.startswith(pattern[:-1])
        return feature == pattern

    def rejects(self, feature: str) -> str | None:
        """The rule that removes an event of this feature, or None if it passes."""
        if any(self._matches(p, feature) for p in self.exclude):
            return f"{self.rule}.exclude"
        if not any(self._matches(p, feature) for p in self.include):
            return f"{self.rule}.include"
        return None


@dataclass(frozen=True, slots=True)
class PrivateMetadataRule:
    mode: PrivateMode
    non_string: NonString
    replacement: str
    rule: str

    def replacement_for(self, kind: str | None) -> str:
        """What replaces a non-string value holding `kind` (a google.protobuf.Value oneof member; None: unset)."""
        return sourcegraph_marker(kind) if self.non_string == "sourcegraph-marker" else self.replacement

    @property
    def non_string_rule(self) -> str:
        """The rule a decision record names for a non-string value dropped or replaced."""
        return f"{self.rule}.non_string"


@dataclass(frozen=True, slots=True)
class KindRules:
    """Everything that decides what an event of one identifier kind may carry."""

    kind: str
    marketing_tracking: Setting[Literal["drop", "keep"]]
    private_metadata: PrivateMetadataRule
    drop_fields: Setting[tuple[str, ...]]
    unknown_fields: Setting[Literal["discard", "keep"]]
    events: FeatureFilter
    invalid_events: Setting[Literal["drop", "forward"]]
    legacy_metadata: Setting[Literal["merge", "keep"]]


@dataclass(frozen=True, slots=True)
class UserMetadataRules:
    enabled: bool
    user_fields: frozenset[str]
    organization_fields: frozenset[str]
    rule: str = "user_metadata"


# What an override may match on, per identifier kind: the Identifier's own fields, except the
# license key, which a policy names only by its SHA-256 fingerprint (MATCH_FINGERPRINT).
MATCH_FINGERPRINT = "license_key_sha256"
MATCH_FIELDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "licensed_instance": (MATCH_FINGERPRINT, "instance_id", "external_url"),
        "unlicensed_instance": ("instance_id", "external_url"),
        "managed_service": ("service_id", "service_environment"),
        "workspace": ("workspace_id", "external_url"),
    }
)


@dataclass(frozen=True, slots=True)
class Override:
    """Rules for the one identifier its match names, replacing its kind's rules key by key.

    match: (field, value) pairs that must all be equal (license_key_sha256: the SHA-256 of the
    identifier's license_key, lowercase hex). rules: the kind's rules with the override's keys
    put in (their rule names say overrides.NAME.KEY). access: the RPCs this identifier may call,
    replacing the kind's access lists, or None to keep them.
    """

    name: str
    kind: str
    match: tuple[tuple[str, str], ...]
    rules: KindRules
    access: Setting[frozenset[str]] | None
    origin: Origin
    description: str = ""

    @property
    def key(self) -> str:
        """The policy key of the override (overrides.NAME); also what the engine files its rules under."""
        return f"overrides.{self.name}"

    @property
    def verified(self) -> bool:
        """Matched on something a caller cannot claim without a secret: the license key."""
        return any(name == MATCH_FINGERPRINT for name, _ in self.match)


@dataclass(frozen=True)
class Policy:
    """A loaded policy. Built only by policy.loader; evaluation reads nothing else."""

    name: str
    files: tuple[str, ...]  # every file read, the policy first
    sha256: str  # over the bytes of every file read, in order
    access: Mapping[str, frozenset[str]]  # RPC -> kinds allowed
    credentials_required: frozenset[str]
    credentials_scopes: tuple[str, ...]  # SAMS scopes; a token covering any one of them suffices
    user_metadata: UserMetadataRules
    kinds: Mapping[str, KindRules]
    allowlist: Allowlist
    acknowledged: frozenset[str] = frozenset()
    overrides: tuple[Override, ...] = ()  # in file order; no two can match the same identifier
