"""Load a policy file (and the allowlists it names) into an immutable policy.model.Policy.

Loading reports every problem at once: YAML problems first (a file that cannot be
read as data cannot be checked further), then every schema violation, then every
semantic problem (unknown field paths, conflicting allowlist entries). An entry repeated
with the same keys loads (the first one is kept); lint reports it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator
from functools import cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jsonschema

from telemetry_guard.policy import fieldpaths
from telemetry_guard.policy.errors import PolicyError, Problem
from telemetry_guard.policy.kinds import KINDS, RPCS
from telemetry_guard.policy.model import (
    MATCH_FIELDS,
    MATCH_FINGERPRINT,
    Allowlist,
    AllowlistEntry,
    FeatureFilter,
    KindRules,
    Origin,
    Override,
    Policy,
    PrivateMetadataRule,
    Setting,
    UserMetadataRules,
)
from telemetry_guard.policy.scopes import DEFAULT_SCOPES
from telemetry_guard.policy.yamlsource import Located, Path_, dotted, read

DEFAULT_REPLACEMENT = "telemetry-guard: value is not a string"

# What a key the policy does not set falls back to: the strictest choice.
STRICTEST: dict[str, Any] = {
    "marketing_tracking": "drop",
    "private_metadata": {"mode": "drop"},
    "drop_fields": [],
    "unknown_fields": "discard",
    # The one non-strict fallback: the event filter selects an export mode (all / cody only /
    # disabled); what an event carries is still governed by the strict rules above.
    "events": {"include": ["*"], "exclude": []},
    "invalid_events": "drop",
    "legacy_metadata": "merge",
}

BUILTIN_PREFIX = "builtin:"

FINGERPRINT_HINT = (
    "must be the SHA-256 fingerprint of the license key, 64 lowercase hex digits "
    '(printf %s "$KEY" | sha256sum); the key itself is never written in a policy'
)

EMPTY_KEY_FINGERPRINT = hashlib.sha256(b"").hexdigest()

# The keys an override may set that replace a kind rule (access is its own).
OVERRIDE_RULE_KEYS = (
    "marketing_tracking",
    "private_metadata",
    "drop_fields",
    "unknown_fields",
    "events",
    "invalid_events",
    "legacy_metadata",
)


@cache
def schema(name: str) -> dict[str, Any]:
    text = resources.files("telemetry_guard.policy").joinpath("schema", name).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def builtin_allowlist_path(name: str) -> Path:
    """The file of a shipped allowlist (allowlists/NAME.yaml), by its real path (not through a link)."""
    return Path(str(resources.files("telemetry_guard.allowlists").joinpath(f"{name}.yaml"))).resolve()


def _digest(contents: list[bytes]) -> str:
    digest = hashlib.sha256()
    for content in contents:
        digest.update(hashlib.sha256(content).digest())
    return digest.hexdigest()


def files_sha256(files: tuple[str, ...]) -> str | None:
    """The sha256 a policy read from these files has (Policy.sha256), as they are now; None if one is gone.

    Lets a watcher tell whether the files changed between loading them and looking at them.
    """
    try:
        return _digest([Path(file).read_bytes() for file in files])
    except OSError:
        return None


def allowlist_path(ref: str, policy_path: Path) -> Path:
    """Where an `allowlists:` item points: builtin:NAME, or a path relative to the policy file."""
    if ref.startswith(BUILTIN_PREFIX):
        return builtin_allowlist_path(ref[len(BUILTIN_PREFIX) :])
    return (policy_path.parent / ref).resolve()


def default_policy_path() -> Path:
    """The policy used when none is given: the seed's rules (policy/default.yaml), by its real path."""
    return Path(str(resources.files("telemetry_guard.policy").joinpath("default.yaml"))).resolve()


def default_policy() -> Policy:
    return load_policy(default_policy_path())


def load_policy(path: str | Path) -> Policy:
    """Load and compile a policy; raise PolicyError listing every problem found."""
    path = Path(path)
    try:
        doc = read(path)
    except PolicyError as exc:
        raise PolicyError(exc.problems, files=(str(path),)) from None
    problems = schema_problems(doc, "policy.schema.json")
    named = _named_allowlists(doc, path)
    if problems:
        raise PolicyError(problems, files=(str(path), *named))
    data = doc.data
    allowlist, files, digest_parts, list_problems = _load_allowlists(doc, path)
    kinds, kind_problems = compile_kinds(doc)
    overrides, override_problems = compile_overrides(doc, kinds)
    problems = list_problems + kind_problems + override_problems
    if problems:
        raise PolicyError(problems, files=(str(path), *named))

    digest = _digest([doc.text.encode("utf-8"), *digest_parts])
    access = data.get("access", {})
    credentials = data.get("credentials", {})
    user_meta = data.get("user_metadata", {})
    return Policy(
        name=path.name,
        files=(str(path), *files),
        sha256=digest,
        access=MappingProxyType({rpc: frozenset(access.get(rpc, [])) for rpc in RPCS}),
        credentials_required=frozenset(credentials.get("required_for", ["managed_service", "workspace"])),
        credentials_scopes=_scopes(credentials.get("scope", DEFAULT_SCOPES)),
        user_metadata=UserMetadataRules(
            enabled=bool(user_meta.get("enabled", False)),
            user_fields=frozenset(user_meta.get("user_fields", [])),
            organization_fields=frozenset(user_meta.get("organization_fields", [])),
        ),
        kinds=MappingProxyType(kinds),
        allowlist=allowlist,
        acknowledged=frozenset(data.get("acknowledged", [])),
        overrides=overrides,
    )


def _scopes(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """credentials.scope as written: one scope or a list of them (the schema checked their form)."""
    return (value,) if isinstance(value, str) else tuple(value)


def _anchored_pattern(
    validator: Any, pattern: str, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    """JSON Schema's "pattern", with "$" meaning the end of the string: Python's re lets "$" match
    before a trailing newline, which would admit names the gateway rejects ("cody\n")."""
    anchored = pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern
    if validator.is_type(instance, "string") and not re.search(anchored, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft202012Validator, {"pattern": _anchored_pattern}
)


def schema_problems(doc: Located, schema_name: str) -> list[Problem]:
    validator = _Validator(schema(schema_name))
    problems = []
    for error in validator.iter_errors(doc.data):
        path = tuple(error.absolute_path)
        if path and path[-1] == MATCH_FINGERPRINT and error.validator == "pattern":
            # Never echo it: a value that is not a fingerprint may be the license key itself.
            problems.append(doc.problem(path, FINGERPRINT_HINT))
            continue
        if error.validator == "minProperties" and path[-1:] == ("match",):
            problems.append(doc.problem(path, "match needs the kind and at least one identifier field"))
            continue
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            # Report each unexpected key where it is written, not at its parent.
            known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
            allowed = ", ".join(sorted(known))
            for key in error.instance:
                if key not in known:
                    problems.append(doc.problem((*path, key), f"unknown key {key!r}; allowed keys: {allowed}"))
            continue
        problems.append(doc.problem(path, explain_schema_error(error)))
    return problems


def explain_schema_error(error: jsonschema.ValidationError) -> str:
    """A schema error in reviewer's words, listing the allowed values where there are some."""
    if error.validator == "enum":
        allowed = [str(v) for v in _listed(error.validator_value)]
        return f"{error.instance!r} is not allowed; use one of: {', '.join(allowed)}"
    if error.validator == "pattern" and isinstance(error.schema, dict) and "x-expected" in error.schema:
        return f"{error.instance!r} is not {error.schema['x-expected']}"
    if error.validator == "const":
        return f"{error.instance!r} is not allowed; must be {error.validator_value!r}"
    return str(error.message)


def _listed(value: object) -> list[object]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _named_allowlists(doc: Located, policy_path: Path) -> list[str]:
    """The allowlist files a policy document names, found or not (a reloader watches them)."""
    refs = doc.data.get("allowlists", []) if isinstance(doc.data, dict) else []
    if not isinstance(refs, list):
        return []
    named = []
    for ref in refs:
        if isinstance(ref, str):
            try:
                named.append(str(allowlist_path(ref, policy_path)))
            except (OSError, ValueError):
                continue
    return named


def _load_allowlists(doc: Located, policy_path: Path) -> tuple[Allowlist, list[str], list[bytes], list[Problem]]:
    entries: dict[tuple[str, str], AllowlistEntry] = {}
    files: list[str] = []
    raw: list[bytes] = []
    problems: list[Problem] = []
    for i, ref in enumerate(doc.data.get("allowlists", [])):
        file = allowlist_path(ref, policy_path)
        if not file.is_file():
            problems.append(doc.problem(("allowlists", i), f"allowlist {ref!r} not found ({file})"))
            continue
        try:
            listed = read(file)
        except PolicyError as exc:
            problems.extend(exc.problems)
            continue
        found = schema_problems(listed, "allowlist.schema.json")
        if found:
            problems.extend(found)
            continue
        files.append(str(file))
        raw.append(listed.text.encode("utf-8"))
        for j, item in enumerate(listed.data["entries"]):
            origin = Origin(listed.file, listed.where(("entries", j))[0])
            entry = AllowlistEntry(
                feature=item["feature"],
                action=item["action"],
                keys=frozenset(item["keys"]),
                reason=item["reason"],
                origin=origin,
                approved_by=item.get("approved_by", ""),
            )
            key = (entry.feature, entry.action)
            earlier = entries.get(key)
            if earlier is None:
                entries[key] = entry
                continue
            if earlier.keys == entry.keys:
                continue  # a repeat changes nothing (Sourcegraph's published list has one): lint warns
            line, col = listed.where(("entries", j))
            problems.append(
                Problem(
                    listed.file,
                    line,
                    col,
                    f"entries[{j}]",
                    f"conflicting allowlist entry for feature {entry.feature!r} action {entry.action!r}: "
                    f"already at {earlier.origin}",
                )
            )
    return Allowlist(MappingProxyType(entries), tuple(files)), files, raw, problems


def _private_metadata_problems(doc: Located, key: Path_, pm: dict[str, Any]) -> list[Problem]:
    """A private_metadata setting's replacement goes with non_string: replace, and only with it."""
    if pm.get("non_string") == "replace" and "replacement" not in pm:
        return [doc.problem(key, "non_string: replace needs a replacement string")]
    if "replacement" in pm and pm.get("non_string") != "replace":
        return [
            doc.problem(
                (*key, "replacement"),
                f"replacement applies only to non_string: replace, not {pm.get('non_string', 'drop')}",
            )
        ]
    return []


def _private_metadata_rule(pm: dict[str, Any], rule: str) -> PrivateMetadataRule:
    return PrivateMetadataRule(
        mode=pm["mode"],
        non_string=pm.get("non_string", "drop"),
        replacement=pm.get("replacement", DEFAULT_REPLACEMENT),
        rule=rule,
    )


def compile_kinds(doc: Located) -> tuple[dict[str, KindRules], list[Problem]]:
    defaults = doc.data.get("defaults", {})
    overrides = doc.data.get("kinds", {})
    problems: list[Problem] = []
    for section, rules in [("defaults", defaults)] + [("kinds." + k, v) for k, v in overrides.items()]:
        for i, path in enumerate(rules.get("drop_fields", [])):
            resolved = fieldpaths.resolve(path)
            if isinstance(resolved, str):
                key = (*section.split("."), "drop_fields", i)
                problems.append(doc.problem(key, f"{path!r}: {resolved}"))
        pm_key = (*section.split("."), "private_metadata")
        problems += _private_metadata_problems(doc, pm_key, rules.get("private_metadata", {}))

    compiled: dict[str, KindRules] = {}
    for kind in KINDS:
        own = overrides.get(kind, {})

        def pick(key: str, kind: str = kind, own: dict[str, Any] = own) -> tuple[Any, str]:
            if key in own:
                return own[key], dotted(("kinds", kind, key))
            if key in defaults:
                return defaults[key], dotted(("defaults", key))
            return STRICTEST[key], f"strictest-default.{key}"

        pm, pm_rule = pick("private_metadata")
        events, events_rule = pick("events")
        compiled[kind] = KindRules(
            kind=kind,
            marketing_tracking=Setting(*pick("marketing_tracking")),
            private_metadata=_private_metadata_rule(pm, pm_rule),
            drop_fields=Setting(*_as_tuple(pick("drop_fields"))),
            unknown_fields=Setting(*pick("unknown_fields")),
            events=FeatureFilter(
                include=tuple(events.get("include", ["*"])),
                exclude=tuple(events.get("exclude", [])),
                rule=events_rule,
            ),
            invalid_events=Setting(*pick("invalid_events")),
            legacy_metadata=Setting(*pick("legacy_metadata")),
        )
    return compiled, problems


def _as_tuple(picked: tuple[Any, str]) -> tuple[tuple[str, ...], str]:
    value, rule = picked
    return tuple(value), rule


def compile_overrides(doc: Located, kinds: dict[str, KindRules]) -> tuple[tuple[Override, ...], list[Problem]]:
    """The overrides section: each one's kind rules with its own keys put in (see model.Override)."""
    problems: list[Problem] = []
    compiled: list[Override] = []
    for name, raw in doc.data.get("overrides", {}).items():
        here = ("overrides", name)
        match = raw["match"]
        kind = match["kind"]
        fields = tuple((f, match[f]) for f in MATCH_FIELDS[kind] if f in match)
        for field in match:
            if field != "kind" and field not in MATCH_FIELDS[kind]:
                problems.append(
                    doc.problem(
                        (*here, "match", field),
                        f"{kind} identifiers have no field {field!r}; match on one of: {', '.join(MATCH_FIELDS[kind])}",
                    )
                )
        if match.get(MATCH_FINGERPRINT) == EMPTY_KEY_FINGERPRINT:
            problems.append(
                doc.problem(
                    (*here, "match", MATCH_FINGERPRINT),
                    "this is the fingerprint of an empty license key, which no licensed instance sends",
                )
            )
        for i, path in enumerate(raw.get("drop_fields", [])):
            resolved = fieldpaths.resolve(path)
            if isinstance(resolved, str):
                problems.append(doc.problem((*here, "drop_fields", i), f"{path!r}: {resolved}"))
        problems += _private_metadata_problems(doc, (*here, "private_metadata"), raw.get("private_metadata", {}))
        for earlier in compiled:
            if earlier.kind == kind and _may_overlap(dict(earlier.match), dict(fields)):
                problems.append(
                    doc.problem(
                        (*here, "match"),
                        f"can match the same identifier as {earlier.key} (line {earlier.origin.line}): "
                        "give them a field with different values, or merge them",
                    )
                )
        access = raw.get("access")
        compiled.append(
            Override(
                name=name,
                kind=kind,
                match=fields,
                rules=_override_rules(kinds[kind], raw, dotted(here)),
                access=None if access is None else Setting(frozenset(access), dotted((*here, "access"))),
                origin=Origin(doc.file, doc.where(here)[0]),
                description=raw.get("description", ""),
            )
        )
    return tuple(compiled), problems


def _may_overlap(a: dict[str, str], b: dict[str, str]) -> bool:
    """Whether one identifier can satisfy both matches: no field both name has different values."""
    return all(a[field] == b[field] for field in a.keys() & b.keys())


def _override_rules(base: KindRules, raw: dict[str, Any], prefix: str) -> KindRules:
    """base with the override's keys put in, each named by its own key (prefix.KEY)."""
    changes: dict[str, Any] = {}
    for key in OVERRIDE_RULE_KEYS:
        if key not in raw:
            continue
        value, rule = raw[key], f"{prefix}.{key}"
        if key == "private_metadata":
            changes[key] = _private_metadata_rule(value, rule)
        elif key == "events":
            changes[key] = FeatureFilter(
                include=tuple(value.get("include", ["*"])), exclude=tuple(value.get("exclude", [])), rule=rule
            )
        else:
            changes[key] = Setting(tuple(value) if key == "drop_fields" else value, rule)
    return dataclasses.replace(base, **changes)
