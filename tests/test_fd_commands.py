"""The `/fd` grammar: every attribute as a flag, and a specific error for each bad input."""

from __future__ import annotations

import pytest

from bot.errors import UsageError
from bot.flexdeploy.commands import parse_fd
from bot.flexdeploy.requests import FdCancel, FdDelete, FdHelp, FdShow, FdStatus, FdWrite, FileSpec


def test_show_delete_status_cancel_help() -> None:
    assert parse_fd("") == FdHelp() and parse_fd("help") == FdHelp()
    assert parse_fd('show 101 "Release 42"') == FdShow(101, "Release 42")
    assert parse_fd("show 101 Release 42") == FdShow(101, "Release 42")  # unquoted words are joined
    assert parse_fd("delete 7 a/b") == FdDelete(7, "a/b")
    assert parse_fd("status 101 'Größe ✓' completed") == FdStatus(101, "Größe ✓", "COMPLETED")
    assert parse_fd("cancel f12") == FdCancel("F12")


def test_every_attribute_is_a_flag() -> None:
    parsed = parse_fd(
        'create 101 "Release 43" --description Spring fixes --files "1:/src/a.cls=ApexClass, 2:/src/b.cls" '
        "--tests ATest,BTest --version-syntax 43.0.${BUILD} --status inactive --add-file-filter Tax"
    )
    assert isinstance(parsed, FdWrite) and parsed.action == "create"
    fields = parsed.fields
    assert fields.description == "Spring fixes"
    assert fields.files == (FileSpec("/src/a.cls", 1, "ApexClass"), FileSpec("/src/b.cls", 2, None))
    assert fields.tests == "ATest,BTest" and fields.test_level == "RunSpecifiedTests"
    assert fields.version_syntax == "43.0.${BUILD}" and fields.package_status == "INACTIVE"
    assert fields.add_file_filter == "Tax"
    dynamic = parse_fd(r"create 101 Profiles --type dynamic --include .*\.profile,.*\.layout --exclude .*Admin.*")
    assert isinstance(dynamic, FdWrite)
    assert dynamic.fields.package_type == "DYNAMIC" and dynamic.fields.include_path == r".*\.profile,.*\.layout"
    sort = parse_fd('add 101 R --files "/src/a.cls, /src/b.cls" --sort-all --test-level runlocaltests')
    assert isinstance(sort, FdWrite) and sort.fields.sort_all is True and sort.fields.test_level == "RunLocalTests"
    replace = parse_fd("replace 101 R --files none")
    assert isinstance(replace, FdWrite) and replace.fields.files == ()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("create 101 R --type DYNAMIC --include a(b", "`a(b` is not a valid regular expression"),
        ("create 101 R --type DYNAMIC --include a{1,3}", "would split an expression in two"),
        ('add 101 R --files "1:/a.cls, /b.cls"', "Sequence numbers are given for all files or for none"),
        ('add 101 R --files "1:/a.cls, 1:/b.cls"', "Sequence number 1 is given to more than one file"),
        ('add 101 R --files "/a.cls, /a.cls"', "listed twice"),
        ("create 101 R --include .*", "only apply to DYNAMIC packages"),
        ("create 101 R --type USER_MANAGED --exclude .*", "only apply to DYNAMIC packages"),
        ("create 101 R --type DYNAMIC", "needs `--include"),
        ('create 101 R --type DYNAMIC --include .* --files "/a.cls"', "come from its `--include`"),
        ("status 101 R DONE", "`DONE` is not a package status"),
        ("create 101 R --status COMPLETED", "Completing a package is its own step"),
        ("create 101 R --type MANUAL", "not a package type"),
        ("create 101 R --test-level All", "not a test level"),
        ("create 101 R --tests A --test-level RunLocalTests", "only goes with `--test-level RunSpecifiedTests`"),
        ("create 101 R --tests 'bad name!'", "not valid"),
        ('add 101 R --files "1:/a.cls" --sort-all', "not both"),
        ("add 101 R", "Nothing to add"),
        ("show abc R", "is not a FlexDeploy project id"),
        ("show 101", "needs a project id and a package name"),
        ("show 101 ..", "cannot be used as a package name"),
        ("status 101 R", "takes a project id, a package name and the new status"),
        ("create 101 R --colour red", "Unknown option `--colour`"),
        ("promote 101 R", "Unknown subcommand `promote`"),
        ('add 101 R --files "/a.cls,,/b.cls"', "empty entry"),
        ('add 101 R --files "0:/a.cls"', "start at 1"),
    ],
)
def test_bad_input_gets_a_specific_error_with_usage(text: str, fragment: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_fd(text)
    assert fragment in caught.value.message
    assert caught.value.usage and "/fd show" in caught.value.usage


def test_backslashes_and_slack_entities_reach_the_regex_intact() -> None:
    for text in (
        r"create 101 P --type DYNAMIC --include .*\.cls",
        r'create 101 P --type DYNAMIC --include ".*\.cls"',
        r"create 101 P --type DYNAMIC --include '.*\.cls'",
        "create 101 P --type DYNAMIC --include \u201c.*\\.cls\u201d",
    ):
        parsed = parse_fd(text)
        assert isinstance(parsed, FdWrite) and parsed.fields.include_path == r".*\.cls", text
    named = parse_fd("show 101 R&amp;D &lt;2&gt;")
    assert named == FdShow(101, "R&D <2>")
