"""Tag parsing, template validation, excerpt expansion (exact, compact, ambiguous, missing) and its ratio."""

import pytest

from fineinstructions_core.excerpts import ExcerptError, expand_answer, resolve_excerpt
from fineinstructions_core.genericize import parse_output
from fineinstructions_core.templates import check_template, tags_balanced, template_variables

DOC = (
    "It is known that no preferred inertial frame exists according to the principle of relativity. "
    "Light travels at a constant speed. It is known that the speed of light is finite."
)


def test_template_variables_and_complexity():
    t = "Compare and contrast <fi>entity A</fi> and <fi>entity B</fi>"
    assert template_variables(t) == ("entity A", "entity B")
    check = check_template(t, "Documents comparing two things.", "Compare and contrast cats and dogs")
    assert check.ok and check.complexity == 2


@pytest.mark.parametrize(
    ("template", "description", "reason"),
    [
        ("what effects does diabetes have?", "d", "no_tag"),
        ("what <fi>x</fi> <fi>y", "d", "unbalanced_tags"),
        ("what <fi><fi>x</fi></fi>", "d", "unbalanced_tags"),
        ("what is <fi> </fi>", "d", "empty_tag"),
        ("what effects does <fi>diabetes</fi> have?", "d", "same_as_query"),
        ("what effects does <fi>a condition</fi> have?", "  ", "empty_description"),
        ("", "d", "empty_template"),
        ("<fi>file transfer</fi>", "d", "no_literal_text"),
    ],
)
def test_template_rejections(template, description, reason):
    check = check_template(template, description, "what effects does diabetes have?")
    assert not check.ok and check.reason == reason


def test_tags_balanced():
    assert tags_balanced("<fi>a</fi> and <fi>b</fi>")
    assert not tags_balanced("</fi>a<fi>")


def test_genericizer_output_parsing():
    assert parse_output("Template: who wrote <fi>a book</fi>\nDocument: A text about a book.") == (
        "who wrote <fi>a book</fi>",
        "A text about a book.",
    )
    assert parse_output('{"template": "t <fi>x</fi>", "compatible_document_description": "d"}') == ("t <fi>x</fi>", "d")
    assert parse_output("I cannot help with that") is None
    assert parse_output("{not json") is None


def test_compact_excerpt_expands_to_the_span():
    exp = expand_answer("<excerpt>It is known that<...>the principle of relativity.</excerpt>", DOC)
    assert exp.text == "It is known that no preferred inertial frame exists according to the principle of relativity."
    ((s, e),) = exp.spans
    assert DOC[s:e] == exp.text and exp.ratio == 1.0


def test_ambiguous_prefix_takes_the_shortest_span():
    # "It is known that" occurs twice; the suffix follows both, the second occurrence gives the shorter span.
    s, e = resolve_excerpt(DOC, "It is known that<...>is finite.")
    assert DOC[s:e] == "It is known that the speed of light is finite."


def test_whole_short_span_and_whitespace_tolerance():
    s, e = resolve_excerpt(DOC, "Light  travels\nat a constant speed.")
    assert DOC[s:e] == "Light travels at a constant speed."


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("<excerpt>Sound travels<...>fast.</excerpt>", "excerpt_not_found"),
        ("<excerpt>Light travels<...>no such ending</excerpt>", "excerpt_not_found"),
        ("<excerpt>a made up sentence</excerpt>", "excerpt_not_found"),
        ("<excerpt>Light travels at", "unbalanced_excerpt_tags"),
    ],
)
def test_missing_spans_are_errors(answer, reason):
    with pytest.raises(ExcerptError) as err:
        expand_answer(answer, DOC)
    assert err.value.reason == reason


def test_span_too_long_is_rejected():
    with pytest.raises(ExcerptError) as err:
        resolve_excerpt(DOC, "It is known that<...>is finite.", max_span_chars=10)
    assert err.value.reason == "excerpt_span_too_long"


def test_excerpt_ratio_counts_characters():
    exp = expand_answer("In short: <excerpt>Light travels at a constant speed.</excerpt>", DOC)
    copied = len("Light travels at a constant speed.")
    assert exp.copied_chars == copied
    assert exp.ratio == pytest.approx(copied / len(exp.text))
    assert exp.ratio < 0.8  # the lead-in is 10 of 44 characters
