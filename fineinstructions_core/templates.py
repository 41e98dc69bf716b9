"""Instruction templates: `<fi>...</fi>` tags, their validation and complexity."""

from __future__ import annotations

import re
from dataclasses import dataclass

TAG = re.compile(r"<fi>(.*?)</fi>", re.DOTALL)
_ANY_TAG = re.compile(r"</?fi>")


@dataclass(frozen=True)
class TemplateCheck:
    ok: bool
    reason: str | None
    variables: tuple[str, ...]

    @property
    def complexity(self) -> int:
        return len(self.variables)


def tags_balanced(template: str) -> bool:
    """Tags open and close in order and never nest."""
    depth = 0
    for m in _ANY_TAG.finditer(template):
        depth += 1 if m.group() == "<fi>" else -1
        if depth not in (0, 1):
            return False
    return depth == 0


def template_variables(template: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in TAG.findall(template))


def check_template(template: str, description: str, query: str) -> TemplateCheck:
    """The rules a genericizer output must pass; the first failing rule is the rejection reason."""
    template = template.strip()
    if not template:
        return TemplateCheck(False, "empty_template", ())
    if not tags_balanced(template):
        return TemplateCheck(False, "unbalanced_tags", ())
    variables = template_variables(template)
    if not variables:
        return TemplateCheck(False, "no_tag", ())
    if any(not v for v in variables):
        return TemplateCheck(False, "empty_tag", variables)
    if not _squash(TAG.sub(" ", template)):
        return TemplateCheck(False, "no_literal_text", variables)
    if _squash(strip_tags(template)) == _squash(query) or _squash(template) == _squash(query):
        return TemplateCheck(False, "same_as_query", variables)
    if not description.strip():
        return TemplateCheck(False, "empty_description", variables)
    return TemplateCheck(True, None, variables)


def strip_tags(template: str) -> str:
    return TAG.sub(lambda m: m.group(1), template)


def _squash(s: str) -> str:
    return " ".join(re.findall(r"\w+", s.lower()))
