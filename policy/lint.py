"""Semantic checks of policy and allowlist files, for people who sign off on what may leave.

`lint_files(paths)` reads every file named (policies and allowlists, told apart by
their top-level keys), and returns every finding at once: load errors (the loader's
problems, one finding each), then the semantic rules of RULES. A finding is data -
file, line, column, rule id, severity, message, hint - and rendering is someone
else's job (telemetry_guard.render).

Kind-level rules read the kinds exactly as the loader compiles them, so lint and the
engine cannot disagree about which key decides what; positions come from the key
path each setting remembers (Setting.rule).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

from telemetry_guard.policy import loader
from telemetry_guard.policy import scopes as sams
from telemetry_guard.policy.errors import Problem
from telemetry_guard.policy.kinds import GATEWAY_KINDS, KINDS, SINGLE_TENANT_KINDS
from telemetry_guard.policy.model import KindRules, Policy
from telemetry_guard.policy.sourcegraph_env import awaits_review
from telemetry_guard.policy.yamlsource import Located, Path_, dotted, parse_all, read_all

Severity = Literal["error", "warning", "note"]
SEVERITIES: Final[tuple[Severity, ...]] = ("error", "warning", "note")


@dataclass(frozen=True, slots=True)
class Rule:
    """A lint rule: its id (what `acknowledged:` names), default severity and documentation."""

    id: str
    severity: Severity
    summary: str
    help: str
    acknowledgeable: bool = True


_RULES: Final = (
    Rule(
        "unreadable",
        "error",
        "A file named on the command line cannot be read.",
        "Check the path and its permissions; policies and allowlists are UTF-8 YAML.",
        False,
    ),
    Rule(
        "yaml",
        "error",
        "The file is not YAML that a policy file may contain.",
        "Policy files are one plain YAML mapping: no anchors, aliases, merge keys, custom tags or "
        "duplicate keys. Quote timestamps and other values YAML would convert.",
        False,
    ),
    Rule(
        "load-error",
        "error",
        "The loader refuses the policy or one of its allowlists.",
        "Fix the key named; the policy cannot be used until it loads.",
        False,
    ),
    Rule(
        "missing-allowlist",
        "error",
        "An allowlist the policy names does not exist.",
        "Allowlist paths are relative to the policy file; builtin:NAME names a file shipped in allowlists/.",
        False,
    ),
    Rule(
        "duplicate-entry",
        "warning",
        "The same allowlist entry (feature, action, keys) is written twice.",
        "Keep one of them. The policy loads (the repeat changes nothing), so that a list can be used as "
        "published: Sourcegraph's own lists cody.fixup.user twice.",
    ),
    Rule(
        "conflicting-entry",
        "error",
        "Two allowlist entries for one event type allow different keys.",
        "Merge them into one entry with one reason; the loader refuses the policy until then.",
        False,
    ),
    Rule(
        "marketing-tracking-single-tenant",
        "error",
        "marketing_tracking is kept for a single-tenant kind (licensed_instance, unlicensed_instance).",
        "The protocol says marketing tracking is NEVER exported from single-tenant instances. "
        "Set marketing_tracking: drop for those kinds (under kinds.KIND, or in defaults).",
        False,
    ),
    Rule(
        "private-metadata-keep-single-tenant",
        "error",
        "private_metadata mode keep for a single-tenant kind exports every key of every event.",
        "Single-tenant instances export private_metadata only by allowlist: use "
        "private_metadata: {mode: allowlist} (or drop) for licensed_instance and unlicensed_instance.",
        False,
    ),
    Rule(
        "unknown-fields-kept",
        "error",
        "unknown_fields: keep forwards field numbers no rule has examined.",
        "Use unknown_fields: discard, or list unknown-fields-kept under acknowledged: after review.",
    ),
    Rule(
        "record-event-instance",
        "error",
        "RecordEvent is open to an instance kind; the gateway accepts it only from managed services.",
        "Remove licensed_instance and unlicensed_instance from access.RecordEvent; instances use RecordEvents.",
    ),
    Rule(
        "credentials-not-required",
        "error",
        "managed_service or workspace callers need no bearer token.",
        "The gateway requires SAMS credentials from managed services and workspaces: list both under "
        "credentials.required_for (the default when the key is absent).",
    ),
    Rule(
        "kind-not-served",
        "warning",
        "access lists an identifier kind the gateway does not serve for that RPC: its calls are refused "
        "UNIMPLEMENTED whatever the policy says.",
        "RecordEvent serves managed_service only, PublishInstanceUserMetadata licensed_instance and "
        "unlicensed_instance only: remove the kind so that the policy says what happens.",
    ),
    Rule(
        "scope-not-issued",
        "error",
        "No scope under credentials.scope ends in an action Sourcegraph Accounts issues (read, write, delete): "
        "with token introspection every managed service is refused.",
        "Require telemetry_gateway::events::write (the default), what the gateway checks and Sourcegraph's client "
        "library requests; list the seed's telemetry_gateway::events::publish beside it to accept both.",
    ),
    Rule(
        "override-widening-unverified",
        "error",
        "An override lets more leave than its kind's rules, but matches only on identifier fields the caller "
        "reports itself.",
        "instance_id, external_url, service_id and workspace_id can be claimed by any caller. Match a widening "
        "override on license_key_sha256 (the SHA-256 of the identifier's license key), or make it narrowing.",
        False,
    ),
    Rule(
        "override-widening",
        "note",
        "An override lets more leave than its kind's rules, for the identifier whose license key it fingerprints.",
        "Check that the fingerprint is that of the license key of the instance named in the override's "
        "description, and that what it widens (listed) is what that instance may export.",
    ),
    Rule(
        "sensitive-key",
        "warning",
        "An allowlisted private_metadata key name suggests personal or sensitive data.",
        "Check the call sites: if the value can hold an email, a name, a path, a URL, a query, a "
        "repository, an address or a secret, remove the key; otherwise say why in the entry's reason.",
    ),
    Rule(
        "literal-star-key",
        "warning",
        'An allowlist entry lists the key "*": a literal key named *, not every key.',
        "keys lists key names exactly; there is no wildcard. List the keys that may leave.",
    ),
    Rule(
        "shadowed-entry",
        "warning",
        "An exact allowlist entry is covered by the * entry of its feature, which allows a superset of its keys.",
        "Remove the exact entry if it adds nothing; if it is meant to narrow that action, say so in its reason.",
    ),
    Rule(
        "unreferenced-allowlist",
        "warning",
        "An allowlist file no policy references.",
        "Reference it from a policy's allowlists: list, or delete it so no one reviews a file that has no effect.",
        False,  # not a finding of one policy, so no policy's acknowledged: list can cover it
    ),
    Rule(
        "user-metadata-personal",
        "warning",
        "PublishInstanceUserMetadata exports a personal field (username, primary_email).",
        "Export these only for customers who asked for the analytics features that need them.",
    ),
    Rule(
        "entry-awaiting-review",
        "error",
        "An allowlist entry imported by `telemetry-guard allowlist import` still awaits review.",
        "Write in reason why the keys may leave and in approved_by who approved the entry (Sourcegraph "
        "requires its data team's review of additions); the finding goes once neither says AWAITING REVIEW.",
        False,
    ),
    Rule(
        "entry-without-approval",
        "note",
        "An allowlist entry does not say who approved it.",
        "Add approved_by: every addition needs review by the data team.",
    ),
    Rule(
        "unknown-acknowledgement",
        "warning",
        "acknowledged: names a rule id that lint does not have, or one that cannot be acknowledged.",
        "Use the rule ids lint prints; load errors and the two single-tenant rules cannot be acknowledged.",
        False,
    ),
    Rule(
        "unused-acknowledgement",
        "note",
        "acknowledged: names a rule that finds nothing in this policy.",
        "Remove it, so that a future finding of that rule is not silenced unseen.",
        False,
    ),
)
RULES: Final[Mapping[str, Rule]] = {rule.id: rule for rule in _RULES}

# Words that, as part of a key name, suggest personal or sensitive data.
# fmt: off
SENSITIVE_WORDS: Final = frozenset({
    "email", "mail", "name", "username", "login", "user", "users", "author",
    "path", "file", "filename", "dir", "directory", "url", "uri", "href", "query", "repo", "repos", "repository",
    "ip", "host", "hostname", "address", "addr", "token", "secret", "password", "passwd", "credential",
    "credentials", "auth", "cookie", "session", "phone", "prompt", "content",
})
# fmt: on

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")


@dataclass(frozen=True, order=True, slots=True)
class Finding:
    """One thing lint has to say. line and column are 1-based; 0 = the file as a whole."""

    file: str
    line: int
    column: int
    rule: str
    severity: Severity
    message: str
    hint: str = ""
    acknowledged_in: str = ""  # "policy.yaml:12" when the policy's acknowledged: list covers it

    @property
    def acknowledged(self) -> bool:
        return bool(self.acknowledged_in)


@dataclass(frozen=True)
class LintReport:
    """Every finding for a set of files, sorted by place, and the files looked at."""

    findings: tuple[Finding, ...]
    files: tuple[str, ...]

    def count(self, severity: Severity) -> int:
        return sum(1 for f in self.findings if f.severity == severity and not f.acknowledged)

    @property
    def acknowledged(self) -> int:
        return sum(1 for f in self.findings if f.acknowledged)

    @property
    def unreadable(self) -> bool:
        return any(f.rule == "unreadable" for f in self.findings)

    def exit_code(self, strict: bool = False) -> int:
        """0 clean, 1 errors (or warnings when strict), 2 an input could not be read."""
        if self.unreadable:
            return 2
        if self.count("error") or (strict and self.count("warning")):
            return 1
        return 0


# -- schema documentation (hints reuse the schema's descriptions) ----------------------------


def split_key(key: str) -> Path_:
    """'kinds.workspace.drop_fields[0]' -> ('kinds', 'workspace', 'drop_fields', 0)."""
    out: list[str | int] = []
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        out.append(int(part[1:-1]) if part.startswith("[") else part)
    return tuple(out)


def describe(path: Path_, schema_name: str = "policy.schema.json") -> str:
    """The schema's description of the key at path, or of its nearest described ancestor."""
    root = loader.schema(schema_name)
    node: Mapping[str, Any] | None = root
    found = str(root.get("description", ""))
    for part in path:
        if node is None:
            break
        node = _deref(root, node)
        if isinstance(part, int):
            items = node.get("items")
            node = items if isinstance(items, dict) else None
        else:
            props = node.get("properties", {})
            extra = node.get("additionalProperties")  # a mapping by name (overrides): its values' schema
            node = props.get(part) if isinstance(props, dict) and part in props else None
            if node is None and isinstance(extra, dict):
                node = extra
        if node is not None:
            text = node.get("description") or _deref(root, node).get("description")
            if text:
                found = str(text)
    return found


def _deref(root: Mapping[str, Any], node: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        target: Mapping[str, Any] = root["$defs"][ref[len("#/$defs/") :]]
        return target
    return node


def _hint(rule: str, path: Path_ = (), schema_name: str = "policy.schema.json") -> str:
    text = RULES[rule].help
    if path:
        doc = describe(path, schema_name)
        if doc and doc not in text:
            text = f"{text} [{dotted(path)}: {doc}]"
    return text


# -- reading -------------------------------------------------------------------------------


@dataclass
class _Input:
    """A file named on the command line, read once."""

    path: Path
    shown: str  # as named on the command line
    doc: Located | None = None
    findings: list[Finding] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # YAML problems found while reading

    @property
    def is_allowlist(self) -> bool:
        return self.doc is not None and "entries" in self.doc.data


def _read(name: str) -> _Input:
    path = loader.default_policy_path() if name == loader.BUILTIN_DEFAULT else Path(name)
    item = _Input(path, name)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        item.findings.append(_file_finding(name, "unreadable", f"cannot read: {exc.strerror or exc}"))
        return item
    except UnicodeDecodeError as exc:
        item.findings.append(_file_finding(name, "unreadable", f"not UTF-8 (byte {exc.start})"))
        return item
    item.doc, item.problems = parse_all(text, str(path))
    if item.doc is None:  # nothing to check further: the YAML problems are all there is
        item.findings.extend(_from_problem(p, "yaml") for p in item.problems)
    return item


def _file_finding(file: str, rule: str, message: str) -> Finding:
    return Finding(file, 0, 0, rule, RULES[rule].severity, message, RULES[rule].help)


def _from_problem(problem: Problem, rule: str, schema_name: str = "") -> Finding:
    path = split_key(problem.key) if problem.key else ()
    hint = problem.hint or (_hint(rule, path, schema_name) if schema_name else RULES[rule].help)
    message = f"{problem.key}: {problem.message}" if problem.key else problem.message
    return Finding(problem.file, problem.line, problem.column, rule, RULES[rule].severity, message, hint)


def _classify(problem: Problem, policy_file: str, yaml: frozenset[Problem] = frozenset()) -> Finding:
    """A loader problem as a finding with the most specific rule id."""
    if problem in yaml:
        return _from_problem(problem, "yaml")
    if "conflicting allowlist entry" in problem.message:
        rule = "conflicting-entry"
    elif problem.key.startswith("allowlists[") and "not found" in problem.message:
        rule = "missing-allowlist"
    else:
        rule = "load-error"
    schema_name = "policy.schema.json" if problem.file == policy_file else "allowlist.schema.json"
    return _from_problem(problem, rule, schema_name)


# -- allowlists ------------------------------------------------------------------------------


def key_words(key: str) -> list[str]:
    """'repoName' -> ['repo', 'name']; 'user_email' -> ['user', 'email']; 'IPAddress' -> ['ip', 'address']."""
    return [w.lower() for w in _WORD.findall(key)]


def sensitive_words(key: str) -> list[str]:
    words = key_words(key)
    found = [w for w in words if w in SENSITIVE_WORDS]
    joined = key.lower().replace("_", "").replace("-", "")
    if not found and joined in SENSITIVE_WORDS:
        found = [joined]
    return found


@dataclass(frozen=True, slots=True)
class _Entry:
    doc: Located
    index: int
    feature: str
    action: str
    keys: tuple[str, ...]
    approved: bool
    awaiting_review: bool

    @property
    def place(self) -> tuple[int, int]:
        return self.doc.where(("entries", self.index))

    @property
    def origin(self) -> str:
        return f"{display_path(self.doc.file)}:{self.place[0]}"


def _entries(doc: Located) -> list[_Entry]:
    """The entries of an allowlist as check_allowlist() leaves it (an invalid entry is None: skipped)."""
    return [
        _Entry(
            doc,
            j,
            item["feature"],
            item["action"],
            tuple(item["keys"]),
            bool(item.get("approved_by")),
            awaits_review(item["reason"], item.get("approved_by", "")),
        )
        for j, item in enumerate(doc.data["entries"])
        if item is not None
    ]


def _entry_finding(entry: _Entry, rule: str, message: str, path: Path_ = ()) -> Finding:
    line, column = entry.doc.where(path or ("entries", entry.index))
    return Finding(entry.doc.file, line, column, rule, RULES[rule].severity, message, RULES[rule].help)


def _lint_entries(entries: Sequence[_Entry], check_conflicts: bool) -> list[Finding]:
    """Rules over one combined allowlist (the files of one policy, in order; first entry wins).

    check_conflicts: report conflicting entries (a policy's are load errors, reported by the loader).
    """
    findings: list[Finding] = []
    first: dict[tuple[str, str], _Entry] = {}
    for entry in entries:
        earlier = first.get((entry.feature, entry.action))
        if earlier is None:
            first[(entry.feature, entry.action)] = entry
            continue
        what = "duplicate" if set(earlier.keys) == set(entry.keys) else "conflicting"
        if what == "duplicate" or check_conflicts:
            findings.append(
                _entry_finding(
                    entry,
                    f"{what}-entry",
                    f"entries[{entry.index}]: {what} allowlist entry for feature {entry.feature!r} "
                    f"action {entry.action!r}: already at {earlier.origin}",
                )
            )
    for entry in entries:
        for k, key in enumerate(entry.keys):
            if key == "*":
                findings.append(
                    _entry_finding(
                        entry,
                        "literal-star-key",
                        f'entry for {entry.feature}/{entry.action} lists the key "*": only a key named * '
                        "passes, not every key",
                        ("entries", entry.index, "keys", k),
                    )
                )
                continue
            words = sensitive_words(key)
            if words:
                findings.append(
                    _entry_finding(
                        entry,
                        "sensitive-key",
                        f"key {key!r} of {entry.feature}/{entry.action} may carry personal or sensitive data "
                        f"(suggested by: {', '.join(dict.fromkeys(words))})",
                        ("entries", entry.index, "keys", k),
                    )
                )
        if entry.awaiting_review:
            findings.append(
                _entry_finding(
                    entry,
                    "entry-awaiting-review",
                    f"entry for {entry.feature}/{entry.action} was imported and awaits review: "
                    "its reason or approved_by still says AWAITING REVIEW",
                )
            )
        if not entry.approved:
            findings.append(
                _entry_finding(
                    entry,
                    "entry-without-approval",
                    f"entry for {entry.feature}/{entry.action} has no approved_by",
                )
            )
    for (feature, action), entry in first.items():
        star = first.get((feature, "*"))
        if action == "*" or star is None or not set(entry.keys) <= set(star.keys):
            continue
        if set(entry.keys) == set(star.keys):
            how = "allows the same keys, so this entry changes nothing"
        else:
            narrowed = ", ".join(sorted(entry.keys)) or "no key"
            how = f"allows more; exact entries win, so this entry narrows action {action!r} to: {narrowed}"
        findings.append(
            _entry_finding(
                entry,
                "shadowed-entry",
                f"entry for {feature}/{action} is covered by the entry {feature}/* at {star.origin}, which {how}",
            )
        )
    return findings


# -- policies ------------------------------------------------------------------------------


def _at(doc: Located, path: Path_, rule: str, message: str, hint_path: Path_ | None = None) -> Finding:
    line, column = doc.where(path)
    return Finding(
        doc.file,
        line,
        column,
        rule,
        RULES[rule].severity,
        message,
        _hint(rule, path if hint_path is None else hint_path),
    )


def _rule_path(rule: str) -> Path_ | None:
    """The key path a Setting.rule names, or None for a fallback (strictest-default.*)."""
    parts = tuple(rule.split("."))
    return parts if parts[0] in ("defaults", "kinds") else None


def _by_place(kinds: Iterable[KindRules], pick: Callable[[KindRules], Path_ | None]) -> dict[Path_, list[str]]:
    """Group the kinds whose picked setting is decided by the same key."""
    out: dict[Path_, list[str]] = {}
    for rules in kinds:
        path = pick(rules)
        if path is not None:
            out.setdefault(path, []).append(rules.kind)
    return out


def _decided(uncertain: frozenset[Path_], kind: str, key: str) -> bool:
    """Whether what decides `key` for `kind` is known: no part it could come from was left out."""
    sources = [("defaults", key), ("kinds", kind, key)]
    return not any(
        path[: len(source)] == source or source[: len(path)] == path for path in uncertain for source in sources
    )


def _lint_kinds(
    doc: Located, kinds: Mapping[str, KindRules], uncertain: frozenset[Path_] = frozenset()
) -> list[Finding]:
    """Kind-level rules; a kind whose setting may come from a part left out (it has a problem) is skipped."""
    findings: list[Finding] = []
    kinds = {
        kind: rules
        for kind, rules in kinds.items()
        if all(_decided(uncertain, kind, key) for key in ("marketing_tracking", "private_metadata", "unknown_fields"))
    }
    single = [kinds[k] for k in KINDS if k in SINGLE_TENANT_KINDS and k in kinds]

    def marketing(r: KindRules) -> Path_ | None:
        return _rule_path(r.marketing_tracking.rule) if r.marketing_tracking.value == "keep" else None

    for path, names in _by_place(single, marketing).items():
        findings.append(
            _at(
                doc,
                path,
                "marketing-tracking-single-tenant",
                f"marketing_tracking: keep applies to {', '.join(names)} (single-tenant) through {dotted(path)}",
            )
        )

    def private(r: KindRules) -> Path_ | None:
        pm = r.private_metadata
        found = _rule_path(pm.rule) if pm.mode == "keep" else None
        return None if found is None else (*found, "mode")

    for path, names in _by_place(single, private).items():
        findings.append(
            _at(
                doc,
                path,
                "private-metadata-keep-single-tenant",
                f"private_metadata mode keep applies to {', '.join(names)} (single-tenant) "
                f"through {dotted(path[:-1])}: every key of every event leaves",
            )
        )

    def unknown(r: KindRules) -> Path_ | None:
        return _rule_path(r.unknown_fields.rule) if r.unknown_fields.value == "keep" else None

    for path, names in _by_place([kinds[k] for k in KINDS if k in kinds], unknown).items():
        findings.append(
            _at(
                doc,
                path,
                "unknown-fields-kept",
                f"unknown_fields: keep applies to {', '.join(names)} through {dotted(path)}: "
                "fields this proto does not know pass unexamined",
            )
        )
    return findings


def _lint_access(doc: Located) -> list[Finding]:
    findings: list[Finding] = []
    data = doc.data
    for i, kind in enumerate(data.get("access", {}).get("RecordEvent", [])):
        if kind in SINGLE_TENANT_KINDS:
            findings.append(
                _at(
                    doc,
                    ("access", "RecordEvent", i),
                    "record-event-instance",
                    f"access.RecordEvent opens the unary RPC to {kind}",
                )
            )
    for rpc in ("RecordEvent", "PublishInstanceUserMetadata"):
        for i, kind in enumerate(data.get("access", {}).get(rpc, [])):
            if kind not in GATEWAY_KINDS[rpc] and not (rpc == "RecordEvent" and kind in SINGLE_TENANT_KINDS):
                message = f"access.{rpc} lists {kind}, which the gateway does not serve for {rpc}"
                findings.append(_at(doc, ("access", rpc, i), "kind-not-served", message))
    credentials = data.get("credentials", {})
    scopes = credentials.get("scope")
    listed = [scopes] if isinstance(scopes, str) else scopes if isinstance(scopes, list) else []
    parsed = [sams.parse(scope) for scope in listed if isinstance(scope, str)]
    if listed and not any(found is not None and found[2] in sams.SAMS_ACTIONS for found in parsed):
        required = " or ".join(map(str, listed))
        message = f"credentials.scope requires {required}: no SAMS client is issued such a scope"
        findings.append(_at(doc, ("credentials", "scope"), "scope-not-issued", message))
    if "required_for" in credentials:
        missing = [k for k in ("managed_service", "workspace") if k not in credentials["required_for"]]
        if missing:
            findings.append(
                _at(
                    doc,
                    ("credentials", "required_for"),
                    "credentials-not-required",
                    f"credentials.required_for leaves out {', '.join(missing)}: "
                    "they may publish without a bearer token",
                )
            )
    user_meta = data.get("user_metadata", {})
    if user_meta.get("enabled"):
        for i, name in enumerate(user_meta.get("user_fields", [])):
            if name in ("username", "primary_email"):
                findings.append(
                    _at(
                        doc,
                        ("user_metadata", "user_fields", i),
                        "user-metadata-personal",
                        f"user_metadata.user_fields exports {name}",
                    )
                )
    return findings


def _lint_overrides(doc: Located, policy: Policy) -> list[Finding]:
    """Widening overrides: an error unless matched on the license key fingerprint, else a note listing them."""
    from telemetry_guard.policy.surface import surface  # here: surface imports this module

    findings: list[Finding] = []
    for override in surface(policy).overrides:
        wider = override.widening
        if not wider:
            continue
        what = "; ".join(f"{c.area} {c.subject}: {c.old} -> {c.new}" for c in wider)
        place = ("overrides", override.name, "match")
        if override.verified:
            message = f"{override.rule} widens {override.kind}'s rules for the license it fingerprints: {what}"
            findings.append(_at(doc, place, "override-widening", message))
        else:
            message = (
                f"{override.rule} widens {override.kind}'s rules ({what}) but matches on "
                f"{', '.join(name for name, _ in override.match)}, which any caller can claim"
            )
            findings.append(_at(doc, place, "override-widening-unverified", message))
    return findings


def _acknowledge(doc: Located, findings: list[Finding]) -> list[Finding]:
    """Mark findings the policy acknowledges; report acknowledgements that are wrong or stale."""
    out: list[Finding] = []
    acknowledged: dict[str, int] = {}
    for i, rule_id in enumerate(doc.data.get("acknowledged", [])):
        rule = RULES.get(rule_id)
        if rule is None or not rule.acknowledgeable:
            why = "is not a lint rule" if rule is None else "cannot be acknowledged"
            out.append(_at(doc, ("acknowledged", i), "unknown-acknowledgement", f"{rule_id!r} {why}"))
        else:
            acknowledged[rule_id] = i
    used: set[str] = set()
    for finding in findings:
        i = acknowledged.get(finding.rule, -1)
        if i >= 0:
            used.add(finding.rule)
            out.append(replace(finding, acknowledged_in=f"{doc.file}:{doc.where(('acknowledged', i))[0]}"))
        else:
            out.append(finding)
    for rule_id, i in acknowledged.items():
        if rule_id not in used:
            out.append(
                _at(
                    doc,
                    ("acknowledged", i),
                    "unused-acknowledgement",
                    f"{rule_id!r} is acknowledged but finds nothing in this policy",
                )
            )
    return out


@dataclass
class _PolicyResult:
    findings: list[Finding]
    allowlist_files: list[Path]  # what the policy references (resolved, existing or not)
    read: list[Path]  # the allowlist files that were read


def _lint_policy(item: _Input, doc: Located) -> _PolicyResult:
    """Every problem the loader finds (of every stage at once), then the lint rules on the parts
    that are well formed."""
    check = loader.check_policy(item.path, doc)
    yaml = frozenset(item.problems) | check.yaml
    findings = [_from_problem(p, "yaml") for p in item.problems]
    findings += [_classify(p, doc.file, yaml) for p in check.problems]
    refs = doc.data.get("allowlists", [])
    files = (
        [loader.allowlist_path(ref, item.path) for ref in refs if isinstance(ref, str)]
        if isinstance(refs, list)
        else []
    )
    if check.doc is None:
        return _PolicyResult(findings, files, [])
    kinds, _ = loader.compile_kinds(check.doc)
    own = _lint_kinds(check.doc, kinds, check.uncertain) + _lint_access(check.doc)
    policy = loader.compile_checked(check)
    if policy is not None:  # widening is judged on the compiled rules
        own += _lint_overrides(check.doc, policy)
    entries = [entry for listed in check.allowlists for entry in _entries(listed)]
    own += _lint_entries(entries, check_conflicts=False)  # the loader reported conflicts above
    findings.extend(_acknowledge(check.doc, own))
    return _PolicyResult(findings, files, [Path(listed.file) for listed in check.allowlists])


def _lint_allowlist(doc: Located) -> list[Finding]:
    valid, problems = loader.check_allowlist(doc)
    findings = [_from_problem(p, "load-error", "allowlist.schema.json") for p in problems]
    if valid is not None:
        findings += _lint_entries(_entries(valid), check_conflicts=True)
    return findings


def _is_allowlist_file(path: Path) -> bool:
    doc, _ = read_all(path)
    return doc is not None and "entries" in doc.data


def lint_files(paths: Sequence[str | Path]) -> LintReport:
    """Lint policies and allowlist files together (builtin:default names the shipped policy); every
    finding at once. The report's files are every file read: those named and the allowlists they use."""
    inputs = [_read(str(p)) for p in paths]
    findings: list[Finding] = []
    referenced: set[Path] = set()
    scan_dirs: set[Path] = set()
    read: dict[Path, str] = {
        item.path.resolve(): item.shown for item in inputs if not any(f.rule == "unreadable" for f in item.findings)
    }
    policies = 0
    for item in inputs:
        findings.extend(item.findings)
        if item.doc is None:
            continue
        if item.is_allowlist:
            findings.extend(_from_problem(p, "yaml") for p in item.problems)
            findings.extend(_lint_allowlist(item.doc))
            continue
        policies += 1
        result = _lint_policy(item, item.doc)
        findings.extend(result.findings)
        referenced.update(result.allowlist_files)
        for file in result.read:
            read.setdefault(file.resolve(), str(file))
        builtin_dir = loader.builtin_allowlist_path("x").parent.resolve()
        scan_dirs.update(f.parent for f in result.allowlist_files if f.parent != builtin_dir)

    if policies:
        candidates = {item.path.resolve(): item.path for item in inputs if item.is_allowlist}
        for directory in sorted(scan_dirs):
            for file in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
                if file.resolve() not in candidates and _is_allowlist_file(file):
                    candidates[file.resolve()] = file
        for resolved, shown in sorted(candidates.items()):
            read.setdefault(resolved, str(shown))
            if resolved not in referenced:
                findings.append(
                    Finding(
                        str(shown),
                        1,
                        1,
                        "unreferenced-allowlist",
                        RULES["unreferenced-allowlist"].severity,
                        "no policy linted here references this allowlist file",
                        RULES["unreferenced-allowlist"].help,
                    )
                )
    return LintReport(_dedupe(findings), tuple(display_path(shown) for shown in read.values()))


def display_path(file: str) -> str:
    """A path as a reader wants it: relative to the working directory when it is under it."""
    path = Path(file)
    if path.is_absolute():
        try:
            return str(path.relative_to(Path.cwd()))
        except ValueError:
            return file
    return file


def _dedupe(findings: Iterable[Finding]) -> tuple[Finding, ...]:
    """One finding per (file, place, rule); an unacknowledged copy wins over an acknowledged one.

    The same allowlist file can be linted on its own and through each policy that
    references it; the loader names it by its resolved path, the command line as typed.
    """
    best: dict[tuple[Path, int, int, str], Finding] = {}
    for found in findings:
        finding = replace(found, file=display_path(found.file))
        key = (Path(finding.file).resolve(), finding.line, finding.column, finding.rule)
        held = best.get(key)
        if held is None or (held.acknowledged and not finding.acknowledged):
            best[key] = finding
    return tuple(sorted(best.values()))
