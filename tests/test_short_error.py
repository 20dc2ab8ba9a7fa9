"""One short-error helper (grokking_tracked/messages.py) at every call site: an empty or blank message never
raises inside an error path, and the first useful line is what a user sees."""

import re
from pathlib import Path

from grokking_tracked.messages import first_line, short_error

PACKAGE = Path(__file__).resolve().parents[1] / "grokking_tracked"


def test_an_empty_or_blank_message_gives_the_class_name_and_never_raises():
    assert short_error(ValueError()) == "ValueError"
    assert short_error(RuntimeError("\n  \n")) == "RuntimeError"
    assert first_line("") == "" and first_line("\n\n") == ""


def test_the_first_non_blank_line_stripped_and_bounded():
    assert short_error(RuntimeError("\n  first line  \nsecond")) == "first line"
    assert short_error(RuntimeError("x" * 500), 300) == "x" * 300
    assert first_line("  a\nb", 1) == "a"


def test_no_module_takes_the_first_line_by_hand():
    by_hand = re.compile(r"splitlines\(\)\[0\]")
    offenders = [f"{path.relative_to(PACKAGE)}:{number}" for path in PACKAGE.rglob("*.py") if path.name != "messages.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1) if by_hand.search(line)]
    assert offenders == []
