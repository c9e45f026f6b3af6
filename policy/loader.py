"""Load a policy file (and the allowlists it names) into an immutable policy.model.Policy.

Loading reports every problem at once, in one pass: every YAML problem the reader can get
past, every schema violation, and every semantic problem (unknown field paths, missing
allowlists, conflicting allowlist entries) of the parts that are well formed (an entry
repeated with the same keys loads: lint reports it).
A part that is not (a refused YAML value, a value the schema rejects) is left out of the
semantic checks, so that one mistake is reported once, where it is written (check_policy).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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
from telemetry_guard.policy.yamlsource import Located, Path_, dotted, read_all

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
BUILTIN_DEFAULT = "builtin:default"  # the shipped default policy, as commands accept it for a policy file

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


def builtin_name(file: str | Path) -> str | None:
    """builtin:NAME for a shipped file (the default policy, an allowlist of allowlists/), else None: how a
    reader outside the checkout should see it, rather than by its path in site-packages."""
    path = Path(file).resolve()
    if path == default_policy_path().resolve():
        return BUILTIN_DEFAULT
    if path.suffix == ".yaml" and path == builtin_allowlist_path(path.stem):
        return f"{BUILTIN_PREFIX}{path.stem}"
    return None


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


@dataclass(frozen=True)
class PolicyCheck:
    """Everything one pass over a policy finds.

    doc: the policy with every part that has a problem left out (so it passes its schema), or None
    when the file gave nothing to check; uncertain: the paths left out. yaml: the problems that are
    YAML problems (of the policy or of an allowlist it names). allowlists: the allowlist files
    that were read, each with its invalid entries replaced by None.
    """

    path: Path
    doc: Located | None
    problems: tuple[Problem, ...]
    yaml: frozenset[Problem]
    uncertain: frozenset[Path_]
    named: tuple[str, ...]
    allowlists: tuple[Located, ...]
    allowlist: Allowlist | None = None  # the allowlists combined, when there is no problem
    digest_parts: tuple[bytes, ...] = ()


def check_policy(path: str | Path, doc: Located | None = None) -> PolicyCheck:
    """Read a policy (unless given) and its allowlists; every problem, of every stage, at once."""
    path = Path(path)
    yaml_problems: list[Problem] = []
    if doc is None:
        doc, yaml_problems = read_all(path)
    if doc is None:
        return PolicyCheck(path, None, tuple(yaml_problems), frozenset(yaml_problems), frozenset(), (), ())
    named = tuple(_named_allowlists(doc, path))
    schema_found = schema_problems(doc, "policy.schema.json")
    valid, uncertain = well_formed(doc, "policy.schema.json", schema_found)
    problems = [*yaml_problems, *schema_found]
    if valid is None and not problems:  # never "refused without a reason"
        problems.append(Problem(str(path), 1, 1, "", "the policy does not match its schema"))
    listed: list[Located] = []
    allowlist: Allowlist | None = None
    digest_parts: list[bytes] = []
    if valid is not None:
        listed, list_yaml, list_problems = _read_allowlists(valid, path)
        allowlist, digest_parts, repeats = _compile_allowlists(listed)
        yaml_problems += list_yaml
        kinds, kind_found = compile_kinds(valid)
        problems += list_problems + repeats + kind_found + compile_overrides(valid, kinds)[1]
    return PolicyCheck(
        path,
        valid,
        tuple(problems),
        frozenset(yaml_problems),
        frozenset(uncertain),
        named,
        tuple(listed),
        allowlist,
        tuple(digest_parts),
    )


def load_policy(path: str | Path) -> Policy:
    """Load and compile a policy; raise PolicyError listing every problem found."""
    path = Path(path)
    check = check_policy(path)
    policy = compile_checked(check)
    if policy is None:
        raise PolicyError(list(check.problems), files=(str(path), *check.named))
    return policy


def compile_checked(check: PolicyCheck) -> Policy | None:
    """The policy a check found no problem in, compiled (None: it found some)."""
    if check.problems or check.doc is None or check.allowlist is None:
        return None
    path = check.path
    doc = check.doc
    kinds, _ = compile_kinds(doc)
    overrides, _ = compile_overrides(doc, kinds)
    allowlist = check.allowlist
    files = allowlist.files
    digest = _digest([doc.text.encode("utf-8"), *check.digest_parts])
    data = doc.data
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


# How many times well_formed() leaves parts out before it gives up (each round removes at least one).
_MAX_PRUNE_ROUNDS = 8


def well_formed(
    doc: Located, schema_name: str, found: Sequence[Problem] | None = None
) -> tuple[Located | None, set[Path_]]:
    """doc without the parts that have problems (refused while reading, or rejected by the schema):
    a document that passes its schema, for the semantic checks; and the paths left out.
    None when the document as a whole is unusable (its root is wrong)."""
    data = copy.deepcopy(doc.data)
    removed: set[Path_] = set()
    paths = [*doc.removed, *(_problem_path(p) for p in (found or ()))]
    for _ in range(_MAX_PRUNE_ROUNDS):
        for path in paths:
            cut = _mapping_key(path)
            if cut is None:
                return None, removed
            if _delete(data, cut):
                removed.add(cut)
        paths = [tuple(error.absolute_path) for error in _Validator(schema(schema_name)).iter_errors(data)]
        if not paths:
            return Located(doc.file, data, doc.marks, doc.text, doc.written, doc.removed), removed
    return None, removed


def _problem_path(problem: Problem) -> Path_:
    out: list[str | int] = []
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", problem.key):
        out.append(int(part[1:-1]) if part.startswith("[") else part)
    return tuple(out)


def _mapping_key(path: Path_) -> Path_ | None:
    """The path of the mapping key that holds path (a list is left out whole), or None for the root."""
    for end in range(len(path), 0, -1):
        if isinstance(path[end - 1], str):
            return path[:end]
    return None


def _delete(data: dict[str, Any], path: Path_) -> bool:
    node: Any = data
    for part in path[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(node, dict) and path[-1] in node:
        del node[path[-1]]
        return True
    return False


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


def schema_problems(doc: Located, schema_name: str | dict[str, Any]) -> list[Problem]:
    """Every schema violation (of a schema by file name, or given), each where it is written, in
    plain words; none under a part the reader already refused (it was reported there)."""
    validator = _Validator(schema(schema_name) if isinstance(schema_name, str) else schema_name)
    problems = []
    for error in validator.iter_errors(doc.data):
        path = tuple(error.absolute_path)
        if doc.is_removed(path) or (doc.holds_removed(path) and error.validator != "additionalProperties"):
            continue  # reported where the reader refused it; what holds it cannot be judged
        if path and path[-1] == MATCH_FINGERPRINT and error.validator == "pattern":
            # Never echo it: a value that is not a fingerprint may be the license key itself.
            problems.append(doc.problem(path, FINGERPRINT_HINT))
            continue
        if error.validator == "minProperties" and path[-1:] == ("match",):
            problems.append(doc.problem(path, "match needs the kind and at least one identifier field"))
            continue
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            # Report each unexpected key where it is written, not at its parent.
            known = sorted(error.schema.get("properties", {}) if isinstance(error.schema, dict) else {})
            for key in error.instance:
                if key not in known:
                    problems.append(
                        doc.problem(
                            (*path, key),
                            f"unknown key {key!r}{_did_you_mean(key, known)}; allowed keys: {', '.join(known)}",
                        )
                    )
            continue
        problems.append(doc.problem(path, explain_schema_error(error, doc)))
    return problems


_TYPE_NAMES = {
    "object": "a mapping (key: value pairs)",
    "array": "a list",
    "string": "a string",
    "boolean": "true or false",
    "integer": "a whole number",
    "number": "a number",
    "null": "empty (null)",
}


def explain_schema_error(error: jsonschema.ValidationError, doc: Located | None = None) -> str:
    """A schema error in a reviewer's words: the value as written, and what would be right
    (the allowed values, the closest one)."""
    path = tuple(error.absolute_path)
    shown = doc.shown(path, error.instance) if doc is not None else repr(error.instance)
    rule = error.validator
    if rule == "enum":
        allowed = [str(v) for v in _listed(error.validator_value)]
        return f"{shown} is not allowed{_did_you_mean(error.instance, allowed)}; use one of: {', '.join(allowed)}"
    if rule == "pattern" and isinstance(error.schema, dict) and "x-expected" in error.schema:
        return f"{shown} is not {error.schema['x-expected']}"
    if rule == "const":
        return f"{shown} is not allowed; must be {error.validator_value!r}"
    if rule == "type":
        wanted = " or ".join(_TYPE_NAMES.get(str(t), str(t)) for t in _listed(error.validator_value))
        if isinstance(error.instance, dict | list):
            shown = _TYPE_NAMES["object" if isinstance(error.instance, dict) else "array"]
        return f"must be {wanted}, not {shown}"
    if rule == "required" and isinstance(error.instance, dict):
        missing = [str(k) for k in _listed(error.validator_value) if k not in error.instance]
        return f"{', '.join(missing)} is missing (required here)"
    if rule == "minItems":
        return f"needs at least {error.validator_value} item{'s' if error.validator_value != 1 else ''}"
    if rule in ("minLength", "minProperties"):
        return "must not be empty"
    if rule == "maxLength":
        return f"{shown} is longer than {error.validator_value} characters"
    if rule == "uniqueItems" and isinstance(error.instance, list):
        twice = [item for k, item in enumerate(error.instance) if item in error.instance[:k]]
        return f"lists {twice[0]!r} more than once" if twice else "lists an item more than once"
    if rule == "pattern":
        what = (
            f" ({error.schema.get('description')})"
            if isinstance(error.schema, dict) and error.schema.get("description")
            else ""
        )
        return f"{shown} is not allowed here: it must match {error.validator_value}{what}"
    if rule in ("oneOf", "anyOf"):
        described = error.schema.get("description") if isinstance(error.schema, dict) else None
        named = [
            str(v)
            for branch in _listed(error.validator_value)
            if isinstance(branch, dict)
            for v in branch.get("enum", ())
        ]
        text = f"{shown} is not allowed here"
        if named:
            text += f"{_did_you_mean(error.instance, named)}; use one of: {', '.join(named)}"
        return f"{text} ({described})" if described else text
    return str(error.message)


def _did_you_mean(value: object, choices: Sequence[str]) -> str:
    """' (did you mean marketing_tracking?)' for a near miss, or ''."""
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close and close[0] != value else ""


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


def _read_allowlists(doc: Located, policy_path: Path) -> tuple[list[Located], list[Problem], list[Problem]]:
    """The allowlist files doc names, each as check_allowlist() leaves it; their YAML problems; all problems."""
    listed: list[Located] = []
    yaml_problems: list[Problem] = []
    problems: list[Problem] = []
    for i, ref in enumerate(doc.data.get("allowlists", [])):
        file = allowlist_path(ref, policy_path)
        if not file.is_file():
            problems.append(doc.problem(("allowlists", i), f"allowlist {ref!r} not found ({file})"))
            continue
        found, found_yaml = read_all(file)
        yaml_problems += found_yaml
        problems += found_yaml
        if found is None:
            continue
        valid, found_problems = check_allowlist(found)
        problems += found_problems
        if valid is not None:
            listed.append(valid)
    return listed, yaml_problems, problems


def check_allowlist(doc: Located) -> tuple[Located | None, list[Problem]]:
    """An allowlist's schema problems, and the allowlist with each entry that has one replaced by None
    (the other entries still count); None when the file as a whole is wrong."""
    problems = schema_problems(doc, "allowlist.schema.json")
    bad_entries = {
        path[1]
        for path in (*doc.removed, *(_problem_path(p) for p in problems))
        if len(path) > 1 and path[0] == "entries" and isinstance(path[1], int)
    }
    data = dict(doc.data)
    if isinstance(data.get("entries"), list):
        data["entries"] = [None if j in bad_entries else item for j, item in enumerate(data["entries"])]
    valid, _ = well_formed(
        Located(doc.file, data, doc.marks, doc.text, doc.written, doc.removed), "allowlist.schema.json"
    )
    if valid is None or not isinstance(valid.data.get("entries"), list):
        return None, problems
    return valid, problems


def _compile_allowlists(docs: Sequence[Located]) -> tuple[Allowlist, list[bytes], list[Problem]]:
    """The allowlist files combined (first entry wins), their contents (for the digest), and every
    duplicate or conflicting entry."""
    entries: dict[tuple[str, str], AllowlistEntry] = {}
    files: list[str] = []
    raw: list[bytes] = []
    problems: list[Problem] = []
    for listed in docs:
        files.append(listed.file)
        raw.append(listed.text.encode("utf-8"))
        for j, item in enumerate(listed.data["entries"]):
            if item is None:
                continue
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
    return Allowlist(MappingProxyType(entries), tuple(files)), raw, problems


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


def kind_problems(doc: Located) -> list[Problem]:
    """Semantic problems of defaults and kinds (doc passes its schema): unknown field paths, and
    non_string: replace without a replacement."""
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
    return problems


def compile_kinds(doc: Located) -> tuple[dict[str, KindRules], list[Problem]]:
    """The rules of each kind (doc passes its schema), and kind_problems(doc)."""
    defaults = doc.data.get("defaults", {})
    overrides = doc.data.get("kinds", {})
    problems = kind_problems(doc)
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
