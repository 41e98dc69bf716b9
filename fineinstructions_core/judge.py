"""Stage 5, the judge: Flow Judge's prompt format with the paper's 1..5 rubric; keep scores >= 4.

The instruction and the answer are untrusted (they quote documents): the judge reads them through
`fencing.judge_view`, so markup and instructions inside them can neither close the prompt's sections nor
move the score, and a pair that carries an injection is rejected (`prompt_injection`) whatever its score.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re

import pandas as pd

from . import fencing
from .llm.base import ChatMessage, GenerationRequest, GenerationResult

RUBRIC = """- Score 1: The answer is irrelevant or off-topic: it does not respond to the instruction.
- Score 2: The answer touches the topic but mostly fails to address the instruction.
- Score 3: The answer partly addresses the instruction but misses key parts or is confusing.
- Score 4: The answer addresses the instruction well, with only minor extraneous or vague content.
- Score 5: The answer fully addresses the instruction without extraneous, vague, or repetitive content."""

PROMPT = """# GOAL
Your job is to evaluate a task carried out by an AI system powered by a large language model.
You will be provided with the inputs and output of the task, as well as the evaluation criteria and scoring
rubric. Your task is to evaluate the output of the AI system based on the evaluation criteria and scoring
rubric provided.

# INPUT
Below are the inputs required for performing the task:
<inputs>
<instruction>
{instruction}
</instruction>
</inputs>

# OUTPUT
Below is the output of the task:
<output>
{answer}
</output>

# EVALUATION CRITERIA AND SCORING RUBRIC
Here are the evaluation criteria and the rubric that you need to use for evaluating the task:
<evaluation_criteria>
How well does the answer address the instruction, directly and without extraneous, vague, or repetitive content?
</evaluation_criteria>

<scoring_rubric>
{rubric}
</scoring_rubric>

# INSTRUCTIONS FOR THE EVALUATION
1. Understand the task and criteria: read the instruction, the answer and the rubric.
2. Write your feedback in one or two sentences inside <feedback></feedback> tags.
3. Give a score from 1 to 5 inside <score></score> tags.

Please accurately evaluate the task. Strictly adhere to the evaluation criteria and rubric."""

_SCORE = re.compile(r"<score>\s*([1-5])\s*</score>")
_FEEDBACK = re.compile(r"<feedback>(.*?)</feedback>", re.DOTALL)


def build_request(
    instruction: str,
    answer: str,
    model: str,
    max_new_tokens: int,
    constrain: bool = True,
    prompt_format: str = "flow_judge",
) -> GenerationRequest:
    """Flow Judge's own format, for Flow Judge itself and for any stand-in judge; the pair's text is
    fenced (`fencing.judge_view`)."""
    return flow_judge_request(
        PROMPT.format(instruction=fencing.judge_view(instruction), answer=fencing.judge_view(answer), rubric=RUBRIC),
        model,
        max_new_tokens,
        constrain,
        prompt_format,
    )


def flow_judge_request(
    prompt: str, model: str, max_new_tokens: int, constrain: bool = True, prompt_format: str = "flow_judge"
) -> GenerationRequest:
    """A Flow Judge prompt answered with feedback and a forced `<score>N</score>`, for any criteria."""
    if prompt_format != "flow_judge":
        raise ValueError(f"unknown judge prompt format {prompt_format!r}")
    messages = [ChatMessage("user", prompt)]
    return GenerationRequest(
        model=model,
        messages=tuple(messages),
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        assistant_prefix="<feedback>",
        constraint=("score", "1", "2", "3", "4", "5") if constrain else None,
    )


def parse_output(text: str) -> tuple[int, str] | None:
    m = _SCORE.search(text)
    if not m:
        return None
    f = _FEEDBACK.search(text)
    return int(m.group(1)), (f.group(1).strip() if f else "")


def judge_results(
    pairs: pd.DataFrame, results: list[GenerationResult], min_score: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(instruction_pairs, results) -> (accepted rows, rejected rows); both carry score and feedback."""
    kept, rejected = [], []
    for row, res in zip(pairs.to_dict("records"), results, strict=True):
        row = {k: v for k, v in row.items() if k not in ("raw_output", "status")}
        if res.error:
            rejected.append(row | {"score": None, "feedback": "", "reason": "llm_error", "detail": res.error})
            continue
        parsed = parse_output(res.text)
        if parsed is None:
            rejected.append(
                row | {"score": None, "feedback": res.text[:500], "reason": "judge_unparseable", "detail": ""}
            )
            continue
        score, feedback = parsed
        injection = fencing.find_injection(str(row.get("instruction") or "")) or fencing.find_injection(
            str(row.get("answer") or "")
        )
        if injection:
            # Scored on the text without it (the score is kept for inspection), never accepted.
            rejected.append(
                row | {"score": score, "feedback": feedback, "reason": "prompt_injection", "detail": injection}
            )
        elif score >= min_score:
            kept.append(row | {"score": score, "feedback": feedback, "accepted": True})
        else:
            rejected.append(
                row | {"score": score, "feedback": feedback, "reason": f"score_below_{min_score}", "detail": ""}
            )
    base = [c for c in pairs.columns if c not in ("raw_output", "status")]
    out = pd.DataFrame(kept, columns=base + ["score", "feedback", "accepted"])
    rej = pd.DataFrame(rejected, columns=base + ["score", "feedback", "reason", "detail"])
    if not rej.empty:
        rej["score"] = rej["score"].astype("Int64")
    return out, rej


def gate_rejections(pairs: pd.DataFrame, outcomes: list) -> pd.DataFrame:
    """Pairs a gate rejected before the judge: the judge's rejection shape, no score."""
    base = [c for c in pairs.columns if c not in ("raw_output", "status")]
    rows = [
        {k: v for k, v in row.items() if k in base}
        | {"score": None, "feedback": "", "reason": o.reason, "detail": o.detail}
        for row, o in zip(pairs.to_dict("records"), outcomes, strict=True)
    ]
    rej = pd.DataFrame(rows, columns=base + ["score", "feedback", "reason", "detail"])
    rej["score"] = rej["score"].astype("Int64")
    return rej


def result_score(result: GenerationResult) -> int | None:
    """The score in one judge answer, or None (an error or an unparseable answer)."""
    parsed = None if result.error else parse_output(result.text)
    return None if parsed is None else parsed[0]


def prompt_fingerprint() -> str:
    """Hash of the prompt text as loaded, so an edited or patched prompt makes this stage stale."""
    return hashlib.sha256(json.dumps([PROMPT, RUBRIC, inspect.getsource(fencing)]).encode()).hexdigest()[:16]
