"""service_kit.validation: the one spelling of a UUID, and text normalised and free of controls."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from service_kit.errors import InvalidArgument
from service_kit.validation import Checks

CANONICAL = "3f2b8c1e-7d4a-4b7e-9a55-0c1d2e3f4a5b"


def refused(check: Checks) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as raised:
        check.done()
    return {v.field: v.description for v in raised.value.violations}


def test_a_uuid_is_accepted_only_in_lowercase_with_dashes() -> None:
    checks = Checks()
    assert checks.uuid("id", CANONICAL) == uuid.UUID(CANONICAL)
    checks.done()

    for spelling in (
        CANONICAL.upper(),
        "{" + CANONICAL + "}",
        "urn:uuid:" + CANONICAL,
        CANONICAL.replace("-", ""),
        CANONICAL + "\n",
        " " + CANONICAL,
        "٣" * 8 + CANONICAL[8:],
    ):
        checks = Checks()
        checks.uuid("id", spelling)
        assert set(refused(checks)) == {"id"}, spelling


def test_text_is_nfc_and_stripped() -> None:
    checks = Checks()

    assert checks.text("name", "  Ame\u0301lie  ", max_length=10) == "Am\u00e9lie"
    checks.done()


@pytest.mark.parametrize(
    "text", ["a\nb", "a\rb", "a\tb", "a\x00b", "a\x7fb", "a\x9bb", "a\u202eb", "a\u2066b", "a\u2029b"]
)
def test_single_line_text_refuses_controls_and_reordering(text: str) -> None:
    checks = Checks()
    checks.text("name", text, max_length=100)

    assert set(refused(checks)) == {"name"}


def test_a_note_may_break_lines_but_holds_no_other_control() -> None:
    checks = Checks()
    assert checks.text("note", "line one\n\tline two", max_length=100, multiline=True) == "line one\n\tline two"
    checks.done()

    checks.text("note", "a\rb\x1b[31m", max_length=100, multiline=True)
    assert set(refused(checks)) == {"note"}


def test_length_counts_characters_after_normalising() -> None:
    checks = Checks()
    checks.text("name", "e\u0301" * 5, max_length=5)  # five characters once composed
    checks.done()


def test_instants_outside_the_window_are_refused() -> None:
    checks = Checks()
    checks.within_instant_window("at", datetime(9999, 12, 31, tzinfo=UTC))
    checks.within_instant_window("before", datetime(1999, 12, 31, tzinfo=UTC))

    assert set(refused(checks)) == {"at", "before"}
