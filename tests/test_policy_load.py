"""Loading policies: every invalid file refused with the right Problem, hostile YAML included,
and valid files compiled to the expected immutable Policy.

Invalid policies are named files under testdata/policies/invalid/. Each one says in a
comment which rule it breaks (`# Breaks: ...`) and what the loader must report:

    # expect: FILE:LINE:COLUMN KEY | MESSAGE FRAGMENT

FILE is `.` for the policy itself or a path relative to it (an allowlist), KEY is `-`
for none; `*` leaves LINE, COLUMN or KEY unchecked. Every problem must be expected,
unless the file also says `# expect-more`.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import pytest

from telemetry_guard.policy import RPCS, Policy, PolicyError, Problem, default_policy, load_policy
from telemetry_guard.policy.loader import default_policy_path
from telemetry_guard.policy.model import FeatureFilter, KindRules, PrivateMetadataRule, Setting
from telemetry_guard.policy.yamlsource import MAX_BYTES

TESTDATA = Path(__file__).parent / "testdata"
INVALID = sorted((TESTDATA / "policies" / "invalid").glob("*.yaml"))
REPO = Path(__file__).resolve().parent.parent

# Loading must be bounded: even a hostile file is refused quickly.
FAST = 2.0


@dataclass(frozen=True)
class Expected:
    file: Path
    line: int | None
    column: int | None
    key: str | None
    fragment: str

    def matches(self, problem: Problem) -> bool:
        return (
            Path(problem.file).resolve() == self.file
            and self.line in (None, problem.line)
            and self.column in (None, problem.column)
            and self.key in (None, problem.key)
            and self.fragment in problem.message
        )


_EXPECT = re.compile(r"^# expect: (?P<file>\S+):(?P<line>\*|\d+):(?P<col>\*|\d+) (?P<key>\S+) \| (?P<fragment>.+)$")


def expectations(path: Path) -> tuple[str, list[Expected], bool]:
    """The rule a file breaks, the problems it expects, and whether others may come too."""
    text = path.read_bytes().decode("latin-1")  # one file is deliberately not UTF-8
    rule = ""
    expected = []
    for line in text.splitlines():
        if line.startswith("# Breaks:"):
            rule = line[len("# Breaks:") :].strip()
        match = _EXPECT.match(line)
        if match:
            file = path if match["file"] == "." else (path.parent / match["file"]).resolve()
            expected.append(
                Expected(
                    file=file.resolve(),
                    line=None if match["line"] == "*" else int(match["line"]),
                    column=None if match["col"] == "*" else int(match["col"]),
                    key=None if match["key"] == "*" else ("" if match["key"] == "-" else match["key"]),
                    fragment=match["fragment"],
                )
            )
    return rule, expected, "# expect-more" in text


def load_refused(path: Path) -> list[Problem]:
    """Load a policy that must be refused: PolicyError (no other exception), quickly."""
    start = time.perf_counter()
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    elapsed = time.perf_counter() - start
    assert elapsed < FAST, f"{path.name}: took {elapsed:.2f}s"
    problems = info.value.problems
    assert problems, "a PolicyError must carry at least one Problem"
    assert all(isinstance(p, Problem) for p in problems)
    return problems


def test_there_are_invalid_files() -> None:
    assert len(INVALID) >= 40


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_policy_is_refused_with_the_expected_problems(path: Path) -> None:
    rule, expected, more = expectations(path)
    assert rule, f"{path.name} must say which rule it breaks (# Breaks: ...)"
    assert expected, f"{path.name} must say what the loader reports (# expect: ...)"
    problems = load_refused(path)
    for want in expected:
        assert any(want.matches(p) for p in problems), f"expected {want} among {problems}"
    if not more:
        unexpected = [p for p in problems if not any(want.matches(p) for want in expected)]
        assert not unexpected, f"unexpected problems: {unexpected}"
    # The message of the error lists every problem, each with its file.
    error_text = str(PolicyError(problems))
    for problem in problems:
        assert str(problem) in error_text


def test_problems_are_sorted_by_place_and_named_with_file_line_column_key() -> None:
    path = TESTDATA / "policies" / "invalid" / "several_schema_errors.yaml"
    problems = load_refused(path)
    assert problems == sorted(problems)
    assert [p.line for p in problems] == [4, 6, 7, 9]
    assert str(problems[0]) == f"{path}:4:3: access.RecordEvents: must be a list, not 'everyone'"


# --- hostile inputs generated on the fly ----------------------------------------------------


def test_file_over_the_size_limit_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("w") as out:
        out.write("version: 1\ndescription: '")
        out.write("x" * (MAX_BYTES + 1))
        out.write("'\n")
    (problem,) = load_refused(path)
    assert (problem.file, problem.key) == (str(path), "")
    assert f"file is {path.stat().st_size} bytes; the limit is {MAX_BYTES}" in problem.message


def test_huge_allowlist_is_refused_naming_the_allowlist(tmp_path: Path) -> None:
    allowlist = tmp_path / "big.yaml"
    allowlist.write_text("version: 1\nentries: []\n# " + "x" * (MAX_BYTES + 1) + "\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nallowlists: [big.yaml]\n")
    (problem,) = load_refused(policy)
    assert Path(problem.file) == allowlist
    assert f"the limit is {MAX_BYTES}" in problem.message


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("lists", "version: 1\ndescription: " + "[" * 200_000 + "]" * 200_000 + "\n"),
        ("mappings", "version: 1\ndescription: " + "{a: " * 50_000 + "1" + "}" * 50_000 + "\n"),
        ("block", "version: 1\n" + "".join(" " * i + f"k{i}:\n" for i in range(2000)) + " " * 2000 + "v: 1\n"),
    ],
)
def test_nesting_deeper_than_the_parser_can_go_is_a_policy_error(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / f"deep-{name}.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert time.perf_counter() - start < 5.0
    (problem,) = info.value.problems
    assert problem.file == str(path)
    assert "nest" in problem.message  # "nesting is too deep" / "nesting deeper than 64"


def test_hostile_allowlist_is_refused_naming_the_allowlist(tmp_path: Path) -> None:
    (tmp_path / "tagged.yaml").write_text(
        "version: 1\nentries:\n  - feature: cody.chat\n    action: !!python/name:os.system x\n"
        "    keys: [a]\n    reason: r\n"
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nallowlists: [tagged.yaml]\n")
    (problem,) = load_refused(policy)
    assert (Path(problem.file).name, problem.line, problem.column, problem.key) == (
        "tagged.yaml",
        4,
        13,
        "entries[0].action",
    )
    assert "tag 'tag:yaml.org,2002:python/name:os.system' is not allowed" in problem.message


def test_missing_policy_file_is_a_policy_error(tmp_path: Path) -> None:
    (problem,) = load_refused(tmp_path / "nope.yaml")
    assert (problem.file, problem.line) == (str(tmp_path / "nope.yaml"), 0)
    assert "cannot read" in problem.message


def test_directory_as_policy_is_a_policy_error(tmp_path: Path) -> None:
    (problem,) = load_refused(tmp_path)
    assert "cannot read" in problem.message


def test_directory_as_allowlist_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nallowlists: [lists]\n")
    (problem,) = load_refused(policy)
    assert (problem.line, problem.column, problem.key) == (2, 14, "allowlists[0]")
    assert "allowlist 'lists' not found" in problem.message


def test_a_refusal_names_the_files_the_load_looked_for(tmp_path: Path) -> None:
    """For a reloader to watch: the policy and every allowlist it names, found or not."""
    (tmp_path / "here.yaml").write_text("version: 1\nentries: []\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nallowlists: [here.yaml, gone.yaml]\n")
    with pytest.raises(PolicyError) as refused:
        load_policy(policy)
    assert refused.value.files == (str(policy), str(tmp_path / "here.yaml"), str(tmp_path / "gone.yaml"))
    with pytest.raises(PolicyError) as unreadable:
        load_policy(tmp_path / "none.yaml")
    assert unreadable.value.files == (str(tmp_path / "none.yaml"),)


def test_python_tag_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "policy.yaml"
    path.write_text(f'version: 1\ndescription: !!python/object/apply:os.system ["touch {marker}"]\n')
    load_refused(path)
    assert not marker.exists()


# --- valid policies ---------------------------------------------------------------------------

SOURCEGRAPH_ALLOWLIST = {
    # GATEWAY.md: "Allowlisted event types as Sourcegraph documents them today" (its 28 rows)
    ("cody.completion", "*"): {"languageId", "otherCompletionProviders", "providerModel", "resolvedModel"},
    ("cody.hoverCommands", "visible"): {"languageId"},
    ("blob.codeintel", "*"): {"languageId"},
    ("cody.chat-question", "submitted"): {"chatModel", "chatAgent"},
    ("cody.chatResponse", "*"): {"chatModel"},
    ("cody.chatResponseNew", "*"): {"chatModel"},
    ("cody.command.doc", "executed"): {"model"},
    ("cody.command.edit", "executed"): {"model"},
    ("cody.command.fix", "executed"): {"model"},
    ("cody.command.test", "executed"): {"model"},
    ("search", "execute"): {"lang"},
    ("codeintel.explorePanel.usages", "*"): {"lang"},
    ("codeintel.explorePanel", "*"): {"lang"},
    ("codeintel", "*"): {"lang"},
    ("cody.autoedit", "*"): {"model", "languageId"},
    ("cody.fixup.user", "*"): {"model"},
    ("cody.fixup.response", "*"): {"model"},
    ("cody.fixup.apply", "*"): {"model"},
    ("cody.fixup.persistence", "*"): {"model"},
    ("cody.modelSelector", "*"): {"modelId", "modelProvider"},
    ("cody.smart-apply.context", "applied"): {"model"},
    ("deepsearch", "search.toolcall"): {"toolName", "toolId", "model"},
    ("deepsearch", "search.categorized"): {"topics"},
    ("batchChangeAgent", "categorization"): {"topics"},
    ("admin.users", "delete"): {"userIDs"},
    ("externalApi", "request"): {"procedure"},
    ("metering", "consume"): {"meteringEventId"},
    ("survey.happiness", "submitted"): {"feedback"},
}


def _rules(
    kind: str,
    *,
    marketing: tuple[str, str],
    private: tuple[str, str, str, str],
    drop_fields: tuple[tuple[str, ...], str],
    unknown: tuple[str, str],
    events: tuple[tuple[str, ...], tuple[str, ...], str],
    invalid: tuple[str, str],
    legacy: tuple[str, str],
) -> KindRules:
    return KindRules(
        kind=kind,
        marketing_tracking=Setting(*marketing),
        private_metadata=PrivateMetadataRule(*private),  # type: ignore[arg-type]
        drop_fields=Setting(*drop_fields),
        unknown_fields=Setting(*unknown),
        events=FeatureFilter(*events),
        invalid_events=Setting(*invalid),
        legacy_metadata=Setting(*legacy),
    )


REPLACEMENT = "telemetry-guard: value is not a string"


def test_default_policy_compiles_to_the_seed_rules() -> None:
    policy = default_policy()
    assert policy.name == "default.yaml"
    assert policy.files == (str(default_policy_path()), str(REPO / "allowlists" / "sourcegraph.yaml"))
    assert dict(policy.access) == {
        "RecordEvents": frozenset({"licensed_instance", "unlicensed_instance", "managed_service", "workspace"}),
        "RecordEvent": frozenset({"managed_service"}),
        "PublishInstanceUserMetadata": frozenset({"licensed_instance", "unlicensed_instance"}),
    }
    assert policy.credentials_required == frozenset({"managed_service", "workspace"})
    assert policy.credentials_scopes == ("telemetry_gateway::events::write",)
    assert policy.user_metadata.enabled is False
    assert policy.user_metadata.user_fields == frozenset()
    assert policy.user_metadata.organization_fields == frozenset()
    assert policy.acknowledged == frozenset({"duplicate-entry", "sensitive-key"})

    def shared(kind: str, marketing: tuple[str, str], private: tuple[str, str, str, str]) -> KindRules:
        return _rules(
            kind,
            marketing=marketing,
            private=private,
            drop_fields=((), "defaults.drop_fields"),
            unknown=("discard", "defaults.unknown_fields"),
            events=(("*",), (), "defaults.events"),
            invalid=("forward", "defaults.invalid_events"),
            legacy=("keep", "defaults.legacy_metadata"),
        )

    single_tenant = {
        kind: shared(
            kind,
            ("drop", f"kinds.{kind}.marketing_tracking"),
            ("allowlist", "sourcegraph-marker", REPLACEMENT, f"kinds.{kind}.private_metadata"),
        )
        for kind in ("licensed_instance", "unlicensed_instance")
    }
    services = {
        kind: shared(
            kind, ("keep", "defaults.marketing_tracking"), ("keep", "drop", REPLACEMENT, "defaults.private_metadata")
        )
        for kind in ("managed_service", "workspace")
    }
    assert dict(policy.kinds) == single_tenant | services
    assert list(policy.kinds) == ["licensed_instance", "unlicensed_instance", "managed_service", "workspace"]

    entries = {key: set(entry.keys) for key, entry in policy.allowlist.entries.items()}
    assert entries == SOURCEGRAPH_ALLOWLIST
    assert len(policy.allowlist) == len(SOURCEGRAPH_ALLOWLIST) == 28
    assert all(entry.reason and entry.approved_by for entry in policy.allowlist.entries.values())


def test_default_policy_allowlist_lookup_exact_then_star() -> None:
    allowlist = default_policy().allowlist
    completion = allowlist.lookup("cody.completion", "anything")
    assert completion is not None and completion.action == "*"
    hover = allowlist.lookup("cody.hoverCommands", "visible")
    assert hover is not None and hover.keys == frozenset({"languageId"})
    assert allowlist.lookup("cody.hoverCommands", "hidden") is None
    assert allowlist.lookup("cody", "executed") is None
    origin = allowlist.entries[("cody.completion", "*")].origin
    assert (Path(origin.file).name, origin.line) == ("sourcegraph.yaml", 16)


def test_policy_is_immutable() -> None:
    policy = load_policy(TESTDATA / "policies" / "precedence.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        policy.access["RecordEvent"] = frozenset({"workspace"})  # type: ignore[index]
    with pytest.raises(AttributeError):
        policy.access["RecordEvents"].add("licensed_instance")  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        policy.kinds["workspace"] = policy.kinds["licensed_instance"]  # type: ignore[index]
    with pytest.raises(TypeError):
        del policy.kinds["workspace"]  # type: ignore[attr-defined]
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.kinds["workspace"].marketing_tracking = Setting("keep", "x")  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.kinds["workspace"].private_metadata.mode = "keep"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.kinds["workspace"].marketing_tracking.value = "keep"  # type: ignore[misc]
    assert isinstance(policy.kinds["licensed_instance"].drop_fields.value, tuple)
    assert isinstance(policy.kinds["licensed_instance"].events.include, tuple)
    with pytest.raises(TypeError):
        policy.allowlist.entries[("x.y", "*")] = policy.allowlist.entries[("cody.chat", "*")]  # type: ignore[index]
    entry = policy.allowlist.entries[("cody.chat", "*")]
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.keys = frozenset({"prompt"})  # type: ignore[misc]
    assert isinstance(entry.keys, frozenset)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.user_metadata.enabled = False  # type: ignore[misc]
    assert isinstance(policy.user_metadata.user_fields, frozenset)
    assert isinstance(policy.files, tuple)
    assert isinstance(policy.access, MappingProxyType)


def test_defaults_and_kinds_override_key_by_key() -> None:
    policy = load_policy(TESTDATA / "policies" / "precedence.yaml")
    assert dict(policy.access) == {
        "RecordEvents": frozenset({"workspace", "managed_service"}),
        "RecordEvent": frozenset(),  # not listed: no kind
        "PublishInstanceUserMetadata": frozenset(),
    }
    assert policy.credentials_required == frozenset({"workspace"})
    assert policy.credentials_scopes == ("custom::scope::write", "telemetry_gateway::events::publish")
    assert policy.user_metadata.enabled is True
    assert policy.user_metadata.user_fields == frozenset({"id", "username"})
    assert policy.user_metadata.organization_fields == frozenset({"name"})
    assert policy.acknowledged == frozenset({"some-lint-rule"})

    defaults_private = ("allowlist", "replace", "<redacted>", "defaults.private_metadata")
    defaults_events = (("cody", "cody.*"), ("cody.internal",), "defaults.events")
    defaults_drop = (("user.anonymous_user_id", "interaction.geolocation"), "defaults.drop_fields")

    def from_defaults(kind: str) -> KindRules:
        return _rules(
            kind,
            marketing=("keep", "defaults.marketing_tracking"),
            private=defaults_private,
            drop_fields=defaults_drop,
            unknown=("discard", "strictest-default.unknown_fields"),
            events=defaults_events,
            invalid=("drop", "strictest-default.invalid_events"),
            legacy=("merge", "strictest-default.legacy_metadata"),
        )

    assert policy.kinds["licensed_instance"] == dataclasses.replace(
        from_defaults("licensed_instance"),
        marketing_tracking=Setting("drop", "kinds.licensed_instance.marketing_tracking"),
        drop_fields=Setting((), "kinds.licensed_instance.drop_fields"),
    )
    assert policy.kinds["unlicensed_instance"] == from_defaults("unlicensed_instance")
    assert policy.kinds["managed_service"] == from_defaults("managed_service")
    assert policy.kinds["workspace"] == _rules(
        "workspace",
        marketing=("keep", "defaults.marketing_tracking"),
        # a kind's private_metadata replaces the defaults' as a whole: non_string falls back
        private=("keep", "drop", REPLACEMENT, "kinds.workspace.private_metadata"),
        drop_fields=defaults_drop,
        unknown=("keep", "kinds.workspace.unknown_fields"),
        events=(("*",), (), "kinds.workspace.events"),
        invalid=("forward", "kinds.workspace.invalid_events"),
        legacy=("keep", "kinds.workspace.legacy_metadata"),
    )


def test_missing_keys_fall_back_to_the_strictest_choice() -> None:
    policy = load_policy(TESTDATA / "policies" / "minimal.yaml")
    assert dict(policy.access) == dict.fromkeys(RPCS, frozenset())  # no kind may call anything
    assert policy.credentials_required == frozenset({"managed_service", "workspace"})
    assert policy.credentials_scopes == ("telemetry_gateway::events::write",)
    assert policy.user_metadata.enabled is False
    assert policy.user_metadata.user_fields == frozenset()
    assert policy.user_metadata.organization_fields == frozenset()
    assert len(policy.allowlist) == 0
    assert policy.files == (str(TESTDATA / "policies" / "minimal.yaml"),)
    for kind, rules in policy.kinds.items():
        assert rules.kind == kind
        assert rules.marketing_tracking == Setting("drop", "strictest-default.marketing_tracking")
        assert rules.private_metadata == PrivateMetadataRule(
            "drop", "drop", REPLACEMENT, "strictest-default.private_metadata"
        )
        assert rules.drop_fields == Setting((), "strictest-default.drop_fields")
        assert rules.unknown_fields == Setting("discard", "strictest-default.unknown_fields")
        assert rules.invalid_events == Setting("drop", "strictest-default.invalid_events")
        assert rules.legacy_metadata == Setting("merge", "strictest-default.legacy_metadata")
    assert sorted(policy.kinds) == sorted(["licensed_instance", "unlicensed_instance", "managed_service", "workspace"])


def test_empty_events_filter_and_exclude_only_filter(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\ndefaults:\n  events: {include: []}\nkinds:\n  workspace:\n    events: {exclude: [search]}\n"
    )
    policy = load_policy(path)
    assert policy.kinds["licensed_instance"].events == FeatureFilter((), (), "defaults.events")
    assert policy.kinds["workspace"].events == FeatureFilter(("*",), ("search",), "kinds.workspace.events")


def _write_policy_with_allowlist(root: Path, reason: str) -> Path:
    (root / "lists").mkdir(exist_ok=True)
    (root / "lists" / "mine.yaml").write_text(
        f"version: 1\nentries:\n  - feature: cody.chat\n    action: '*'\n    keys: [model]\n    reason: {reason}\n"
    )
    policy = root / "policy.yaml"
    policy.write_text("version: 1\nallowlists: [lists/mine.yaml]\ndefaults:\n  private_metadata: {mode: allowlist}\n")
    return policy


def test_sha256_covers_the_allowlist_files(tmp_path: Path) -> None:
    path = _write_policy_with_allowlist(tmp_path, "first reason")
    first = load_policy(path)
    assert re.fullmatch(r"[0-9a-f]{64}", first.sha256)
    assert first.files == (str(path), str((tmp_path / "lists" / "mine.yaml").resolve()))
    assert load_policy(path).sha256 == first.sha256  # same bytes, same digest

    _write_policy_with_allowlist(tmp_path, "second reason")
    changed = load_policy(path)
    assert changed.sha256 != first.sha256
    assert changed.allowlist.entries[("cody.chat", "*")].reason == "second reason"

    _write_policy_with_allowlist(tmp_path, "first reason")
    assert load_policy(path).sha256 == first.sha256

    path.write_text(path.read_text() + "# a comment changes the reviewed bytes\n")
    assert load_policy(path).sha256 not in (first.sha256, changed.sha256)


def test_allowlist_paths_are_relative_to_the_policy_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write_policy_with_allowlist(tmp_path, "r")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    policy = load_policy(str(path))  # a str path is accepted too
    assert set(policy.allowlist.entries) == {("cody.chat", "*")}


def test_builtin_allowlist_from_a_policy_anywhere(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\nallowlists: [builtin:sourcegraph]\n")
    policy = load_policy(path)
    assert {key: set(entry.keys) for key, entry in policy.allowlist.entries.items()} == SOURCEGRAPH_ALLOWLIST
    assert policy.files[1] == str(REPO / "allowlists" / "sourcegraph.yaml")


def test_two_allowlists_combine(tmp_path: Path) -> None:
    shutil.copy(TESTDATA / "allowlists" / "small.yaml", tmp_path / "small.yaml")
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\nallowlists: [builtin:sourcegraph, small.yaml]\n")
    policy = load_policy(path)
    assert len(policy.allowlist) == len(SOURCEGRAPH_ALLOWLIST) + 3
    exact = policy.allowlist.lookup("cody.chat", "submitted")
    assert exact is not None and exact.keys == frozenset({"model"})
    star = policy.allowlist.lookup("cody.chat", "other")
    assert star is not None and star.keys == frozenset({"model", "languageId"})


def test_the_docs_give_the_number_of_event_types_builtin_sourcegraph_has() -> None:
    count = len(default_policy().allowlist)
    for doc in (
        "README.md",
        "docs/policy-reference.md",
        "policy/schema/allowlist.schema.json",
        "allowlists/sourcegraph.yaml",
    ):
        stated = re.findall(r"(\d+) event types", (REPO / doc).read_text(encoding="utf-8"))
        assert stated and set(stated) == {str(count)}, doc


def test_an_entry_repeated_with_the_same_keys_loads_and_the_first_is_kept(tmp_path: Path) -> None:
    shutil.copy(TESTDATA / "allowlists" / "duplicate.yaml", tmp_path / "duplicate.yaml")
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\nallowlists: [duplicate.yaml]\n")
    entry = load_policy(path).allowlist.lookup("cody.chat", "submitted")
    assert entry is not None and entry.keys == frozenset({"model"})
    assert (entry.reason, entry.origin.line) == ("Which model answered.", 5)
    # Sourcegraph's published list repeats cody.fixup.user: it loads as published, the first line kept
    fixup = default_policy().allowlist.entries[("cody.fixup.user", "*")]
    text = (REPO / "allowlists" / "sourcegraph.yaml").read_text(encoding="utf-8").splitlines()
    repeats = [n for n, line in enumerate(text, 1) if line == "  - feature: cody.fixup.user"]
    assert len(repeats) == 2 and fixup.origin.line == repeats[0]


def test_valid_testdata_policies_load() -> None:
    for path in sorted((TESTDATA / "policies").glob("*.yaml")):
        assert isinstance(load_policy(path), Policy), path.name


def test_files_sha256_tells_whether_the_files_changed_since_loading(tmp_path: Path) -> None:
    from telemetry_guard.policy.loader import files_sha256

    shutil.copytree(TESTDATA / "allowlists", tmp_path / "allowlists")
    policy_path = tmp_path / "policies" / "p.yaml"
    policy_path.parent.mkdir()
    policy_path.write_text("version: 1\nallowlists: [../allowlists/small.yaml]\n")
    policy = load_policy(policy_path)
    assert files_sha256(policy.files) == policy.sha256
    allowlist = tmp_path / "allowlists" / "small.yaml"
    allowlist.write_text(allowlist.read_text() + "# a reviewer's note\n")
    assert files_sha256(policy.files) != policy.sha256
    allowlist.unlink()
    assert files_sha256(policy.files) is None
