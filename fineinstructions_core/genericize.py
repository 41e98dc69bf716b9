"""Stage 1, the query genericizer: query -> template with `<fi>` tags + compatible document description."""

from __future__ import annotations

import hashlib
import json
import re

import pandas as pd

from .ids import content_id
from .llm.base import ChatMessage, GenerationRequest, GenerationResult
from .templates import check_template

SYSTEM = (
    "You turn a user's query into a reusable instruction template. Replace the specific details "
    "(names, places, products, numbers, topics) with <fi>short description of what goes here</fi> tags, "
    "keep the rest of the wording, and describe the kind of document that could fill the tags and answer "
    "the instruction. Answer with exactly two lines: 'Template: ...' and 'Document: ...'."
)

FEW_SHOT: list[tuple[str, str, str]] = [
    (
        "what effects does diabetes have on the eyes?",
        "what effects does <fi>a medical condition</fi> have on the <fi>a body part</fi>?",
        "A health article that explains a medical condition and how it affects a part of the body.",
    ),
    (
        "who wrote the novel pride and prejudice",
        "who wrote the <fi>type of work</fi> <fi>title of the work</fi>",
        "A text about a book, film or other work that names its author or creator.",
    ),
    (
        "How do I convert a PNG file to JPG on Windows 10?",
        "How do I convert a <fi>file format #1</fi> file to <fi>file format #2</fi> on <fi>operating system</fi>?",
        "A how-to guide or software manual page that describes converting files between formats.",
    ),
    (
        "when did the french revolution start",
        "when did the <fi>historical event</fi> start",
        "A history text that describes a historical event and gives its dates.",
    ),
    (
        "Syntax error in shell script",
        "<fi>type of error</fi> in <fi>kind of program or script</fi>",
        "A technical document or forum answer that explains an error in a program and how to fix it.",
    ),
]


def build_request(
    query: str, model: str, max_new_tokens: int, temperature: float, prompt_format: str = "fewshot"
) -> GenerationRequest:
    """`fewshot` teaches a general chat model the task; `fineinstructions` is the released genericizer's
    own input: the bare query as the user turn, answered with a JSON object."""
    if prompt_format == "fineinstructions":
        return GenerationRequest(
            model=model,
            messages=(ChatMessage("user", query),),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
        )
    if prompt_format != "fewshot":
        raise ValueError(f"unknown genericize prompt format {prompt_format!r}")
    messages = [ChatMessage("system", SYSTEM)]
    for q, t, d in FEW_SHOT:
        messages.append(ChatMessage("user", f"Query: {q}"))
        messages.append(ChatMessage("assistant", f"Template: {t}\nDocument: {d}"))
    messages.append(ChatMessage("user", f"Query: {query}"))
    return GenerationRequest(
        model=model,
        messages=tuple(messages),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        stop=("\n\n", "Query:"),
    )


_TEMPLATE_LINE = re.compile(r"^\s*template\s*:\s*(.+)$", re.IGNORECASE | re.MULTILINE)
_DOC_LINE = re.compile(
    r"^\s*(?:document|compatible[_ ]document[_ ]description)\s*:\s*(.+)$", re.IGNORECASE | re.MULTILINE
)


def parse_output(text: str) -> tuple[str, str] | None:
    """Accepts the two-line format or the released genericizer's JSON; None when neither parses."""
    stripped = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    if stripped.startswith("{"):
        try:
            obj, _ = json.JSONDecoder().raw_decode(stripped)  # trailing text after the object is ignored
            return str(obj["template"]), str(obj.get("compatible_document_description") or "")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            return None
    t = _TEMPLATE_LINE.search(text)
    d = _DOC_LINE.search(text)
    if not t:
        return None
    return t.group(1).strip(), (d.group(1).strip() if d else "")


def genericize_results(queries: pd.DataFrame, results: list[GenerationResult]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(query_set rows, LLM results in the same order) -> (template_bank, rejections)."""
    kept, rejected = [], []
    for row, res in zip(queries.itertuples(index=False), results, strict=True):
        base = {"query_id": row.query_id, "source": row.source, "query": row.query}
        if res.error:
            rejected.append(base | {"raw_output": "", "reason": "llm_error", "detail": res.error})
            continue
        parsed = parse_output(res.text)
        if parsed is None:
            rejected.append(base | {"raw_output": res.text, "reason": "unparseable", "detail": ""})
            continue
        template, description = parsed
        check = check_template(template, description, row.query)
        if not check.ok:
            rejected.append(base | {"raw_output": res.text, "reason": check.reason, "detail": template})
            continue
        kept.append(
            base
            | {
                "template_id": content_id("tpl", template, description),
                "template": template,
                "description": description,
                "variables": list(check.variables),
                "complexity": check.complexity,
            }
        )
    cols = ["template_id", "query_id", "source", "query", "template", "description", "variables", "complexity"]
    rcols = ["query_id", "source", "query", "raw_output", "reason", "detail"]
    return pd.DataFrame(kept, columns=cols), pd.DataFrame(rejected, columns=rcols)


def prompt_fingerprint() -> str:
    """Hash of the prompt text as loaded, so an edited or patched prompt makes this stage stale."""
    return hashlib.sha256(json.dumps([SYSTEM, FEW_SHOT]).encode()).hexdigest()[:16]
