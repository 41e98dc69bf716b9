"""Stage 4, instantiation: (template, document) -> grounded instruction + answer, or `null`.

The instantiator reads the window of the document around the chunk that retrieved the template (a long
book never fits a small model's context), writes its answer with `<excerpt>` tags, and the excerpts are
expanded against the whole document with character offsets kept. Every match gets a row and a status.

The window is untrusted text: the prompt shows it through `fencing.neutralize` (protocol markup in it
disarmed character for character, so offsets hold), the excerpt-copy grammar copies the original window
but never its markup, and an output that still carries protocol markup in its instruction or its
expanded answer (or an `Instruction:` / `Answer:` line in its free text) is rejected as
`protocol_tag_in_answer`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from dataclasses import dataclass

import pandas as pd

from . import fencing
from .excerpts import EXCERPT, ExcerptError, Expansion, expand_answer
from .ids import content_id
from .llm.base import ChatMessage, GenerationRequest, GenerationResult
from .templates import TAG

SYSTEM = (
    "You fill an instruction template with details from a document and answer it by quoting the document. "
    "Write 'Instruction:' with every <fi> tag replaced by words from the document, then 'Answer:' made of "
    "quotes from the document, each quote wrapped as <excerpt>copied text</excerpt>. Never mention 'the "
    "document' or 'the text'. If the document cannot answer the template, write only: null"
)

FEW_SHOT = [
    (
        "what effects does <fi>a medical condition</fi> have on the <fi>a body part</fi>?",
        "Diabetic retinopathy is a complication of diabetes. High blood sugar damages the blood vessels of "
        "the retina, which can cause blurred vision and, without treatment, blindness. Regular eye exams "
        "help detect it early.",
        "Instruction: what effects does diabetes have on the eyes?\n"
        "Answer: <excerpt>High blood sugar damages the blood vessels of the retina, which can cause blurred "
        "vision and, without treatment, blindness.</excerpt>",
    ),
    (
        "when did the <fi>historical event</fi> start",
        "Install the package with apt install foo. The configuration file lives in /etc/foo.conf.",
        "Instruction: null",
    ),
    (
        "How do I <fi>task</fi> with <fi>tool</fi>?",
        "To create an archive, tar is the usual tool. Run tar -czf backup.tar.gz folder/ to compress a "
        "folder. The z option selects gzip compression.",
        "Instruction: How do I compress a folder with tar?\n"
        "Answer: <excerpt>Run tar -czf backup.tar.gz folder/ to compress a folder.</excerpt> "
        "<excerpt>The z option selects gzip compression.</excerpt>",
    ),
]


def template_followed(template: str, instruction: str, min_share: float = 0.5) -> bool:
    """At least `min_share` of the template's own words (outside its tags) appear in the instruction."""
    literal = set(re.findall(r"\w+", TAG.sub(" ", template).lower()))
    if not literal:
        return True
    words = set(re.findall(r"\w+", instruction.lower()))
    return len(literal & words) / len(literal) >= min_share


PAIR_COLUMNS = [
    "pair_id",
    "match_id",
    "document_id",
    "template_id",
    "corpus",
    "instruction",
    "answer",
    "excerpt_spans",
    "excerpt_ratio",
    "status",
    "raw_output",
]

_REFERS = re.compile(r"\b(the|this|that) (document|text|passage|excerpt|article)\b", re.IGNORECASE)


def _user_turn(template: str, document: str) -> str:
    return f"<<<Instruction Template:\n{template}\n>>>\n\n<<<Compatible Document:\n{document}\n>>>"


def _window_turn(template: str, window: str) -> str:
    """The user turn for an untrusted window: its protocol markup disarmed (same length, same offsets)."""
    return _user_turn(template, fencing.neutralize(window))


def build_request(
    template: str,
    window: str,
    model: str,
    max_new_tokens: int,
    temperature: float,
    constrain: bool = True,
    prompt_format: str = "fewshot",
) -> GenerationRequest:
    """`fewshot` teaches a general chat model the task; `fineinstructions` is the released instantiator's
    own input, the paper's framing alone (also what the distilled student is trained on). Constrained, the
    answer is steered into the `Instruction:` / `Answer:` form with verbatim excerpts; unconstrained, a
    released model may answer in its own JSON form, which `parse_output` reads too."""
    constraint = ("excerpt_copy", window, template) if constrain else None
    prefix = "Instruction:" if constrain else ""
    if prompt_format == "fineinstructions":
        return GenerationRequest(
            model=model,
            messages=(ChatMessage("user", _window_turn(template, window)),),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            stop=("<<<",),
            constraint=constraint,
            assistant_prefix=prefix,
        )
    if prompt_format != "fewshot":
        raise ValueError(f"unknown instantiate prompt format {prompt_format!r}")
    messages = [ChatMessage("system", SYSTEM)]
    for t, d, a in FEW_SHOT:
        messages.append(ChatMessage("user", _user_turn(t, d)))
        messages.append(ChatMessage("assistant", a))
    messages.append(ChatMessage("user", _window_turn(template, window)))
    return GenerationRequest(
        model=model,
        messages=tuple(messages),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        stop=("<<<", "\n\n\n"),
        constraint=constraint,
        assistant_prefix=prefix,
    )


def document_window(text: str, center: int, window_chars: int) -> tuple[int, str]:
    """The slice of `text` the instantiator reads, centred on `center`, cut at whitespace."""
    if len(text) <= window_chars:
        return 0, text
    start = max(0, min(len(text) - window_chars, center - window_chars // 2))
    end = start + window_chars
    if start > 0:
        ws = text.find(" ", start)
        start = ws + 1 if 0 <= ws < start + 100 else start
    if end < len(text):
        ws = text.rfind(" ", end - 100, end)
        end = ws if ws > start else end
    return start, text[start:end]


@dataclass
class Parsed:
    instruction: str
    answer: str


def parse_output(text: str) -> Parsed | None | str:
    """Parsed pair, None for a `null` answer, or a string naming why it did not parse.

    Reads both the few-shot format (`Instruction: ...` / `Answer: ...`) and a JSON object with
    `instruction` and `answer` (JSON `null` for a template that does not fit), as a released model writes.
    """
    stripped = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    if stripped.startswith("{"):
        try:
            obj, _ = json.JSONDecoder().raw_decode(stripped)
        except json.JSONDecodeError:
            return "unparseable"
        if not isinstance(obj, dict):
            return "unparseable"
        instruction, answer = obj.get("instruction"), obj.get("answer")
        if instruction is None and answer is None:
            return None
        if not isinstance(instruction, str) or not isinstance(answer, str) or not instruction.strip():
            return "unparseable"
        return Parsed(instruction.strip(), answer.strip()) if answer.strip() else "unparseable"
    stripped = re.sub(r"^\s*Instruction:\s*(?=null\b)", "", stripped, flags=re.IGNORECASE)
    if re.fullmatch(r"[`\"']?null[`\"'.]?", stripped.strip(), re.IGNORECASE):
        return None
    m = re.search(r"Instruction:\s*(.+?)\s*\n\s*Answer:\s*(.+)", stripped, re.DOTALL | re.IGNORECASE)
    if not m:
        return "unparseable"
    instruction, answer = m.group(1).strip(), m.group(2).strip()
    if not instruction or not answer:
        return "unparseable"
    return Parsed(instruction, answer)


@dataclass
class InstantiationCheck:
    """The verdict on one instantiator output: `ok`, or the rejection status with its detail."""

    status: str
    detail: str = ""
    parsed: Parsed | None = None
    expansion: Expansion | None = None


def check_instantiation(
    template: str,
    document: str,
    text: str,
    prefer: int = 0,
    min_excerpt_ratio: float = 0.8,
    max_span_chars: int = 4000,
    min_answer_words: int = 0,
) -> InstantiationCheck:
    """The rules an instantiator output must pass, shared by the pipeline, the seeds and the silver data.
    A `null` answer has the status `null_incompatible`."""
    parsed = parse_output(text)
    if parsed is None:
        return InstantiationCheck("null_incompatible")
    if isinstance(parsed, str):
        return InstantiationCheck(parsed)
    if "<fi>" in parsed.instruction or "</fi>" in parsed.instruction:
        return InstantiationCheck("unfilled_template", parsed.instruction, parsed)
    if tag := fencing.find_markup(parsed.instruction, line_markers=True):
        return InstantiationCheck("protocol_tag_in_answer", f"instruction: {tag}", parsed)
    if not template_followed(template, parsed.instruction):
        return InstantiationCheck("template_not_followed", parsed.instruction, parsed)
    if _REFERS.search(parsed.instruction):
        return InstantiationCheck("refers_to_document", parsed.instruction, parsed)
    # Free text (outside the excerpts) never carries markup or the output format's own line markers.
    free = EXCERPT.sub(" ", parsed.answer).replace("<excerpt>", " ").replace("</excerpt>", " ")
    if tag := fencing.find_markup(free, line_markers=True) or fencing.find_disarmed(parsed.answer):
        return InstantiationCheck("protocol_tag_in_answer", f"answer: {tag}", parsed)
    try:
        exp = expand_answer(parsed.answer, document, prefer=prefer, max_span_chars=max_span_chars)
    except ExcerptError as err:
        return InstantiationCheck(err.reason, err.detail, parsed)
    if tag := fencing.find_markup(exp.text):
        return InstantiationCheck("protocol_tag_in_answer", f"answer: {tag}", parsed, exp)
    if not exp.spans:
        return InstantiationCheck("no_excerpt", "", parsed, exp)
    if len(exp.text.split()) < min_answer_words:
        words = len(exp.text.split())
        return InstantiationCheck("answer_too_short", f"{words} < {min_answer_words} words", parsed, exp)
    if exp.ratio < min_excerpt_ratio:
        return InstantiationCheck("excerpt_ratio_below_min", f"{exp.ratio:.3f} < {min_excerpt_ratio}", parsed, exp)
    return InstantiationCheck("ok", "", parsed, exp)


def instantiate_results(
    matches: pd.DataFrame,
    documents: dict[str, str],
    window_starts: list[int],
    results: list[GenerationResult],
    min_excerpt_ratio: float,
    max_span_chars: int,
    min_answer_words: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(matches with template text, results) -> (instruction_pairs, rejections); one status per match."""
    kept, rejected = [], []
    for row, start, res in zip(matches.itertuples(index=False), window_starts, results, strict=True):
        base = {
            "pair_id": content_id("pair", row.match_id),
            "match_id": row.match_id,
            "document_id": row.document_id,
            "template_id": row.template_id,
            "corpus": row.corpus,
            "raw_output": res.text,
        }

        def reject(status: str, detail: str = "", base: dict = base) -> None:
            rejected.append(base | {"status": status, "reason": status, "detail": detail})

        if res.error:
            reject("llm_error", res.error)
            continue
        document = documents[row.document_id]
        check = check_instantiation(
            row.template, document, res.text, start, min_excerpt_ratio, max_span_chars, min_answer_words
        )
        if check.status != "ok":
            reject(check.status, check.detail)
            continue
        parsed, exp = check.parsed, check.expansion
        assert parsed is not None and exp is not None
        kept.append(
            base
            | {
                "instruction": parsed.instruction,
                "answer": exp.text,
                "excerpt_spans": [list(s) for s in exp.spans],
                "excerpt_ratio": round(exp.ratio, 4),
                "status": "ok",
            }
        )
    rcols = ["pair_id", "match_id", "document_id", "template_id", "corpus", "raw_output", "status", "reason", "detail"]
    return pd.DataFrame(kept, columns=PAIR_COLUMNS), pd.DataFrame(rejected, columns=rcols)


def prompt_fingerprint() -> str:
    """Hash of the prompt text as loaded, so an edited or patched prompt makes this stage stale."""
    return hashlib.sha256(json.dumps([SYSTEM, FEW_SHOT, inspect.getsource(fencing)]).encode()).hexdigest()[:16]
