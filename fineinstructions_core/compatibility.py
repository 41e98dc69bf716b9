"""The paper's labels for the matching embedding: a model judges whether a document is compatible with
a template, in Flow Judge's format with its own criteria, and the 1..5 score becomes a 1/0 label.

Kept apart from the answer judge, so editing one prompt never makes the other's outputs stale. The
document is untrusted text and is read through `fencing.judge_view`, like the answer judge's inputs.
"""

from __future__ import annotations

import hashlib
import inspect
import json

from . import fencing
from .judge import flow_judge_request
from .llm.base import GenerationRequest

COMPATIBILITY_RUBRIC = """- Score 1: The document has nothing to fill the template with: it is about something else.
- Score 2: The document shares the topic, but the template's instruction could not be answered from it.
- Score 3: The document could fill some placeholders, but the answer would need much outside knowledge.
- Score 4: The document could fill the placeholders, and most of the answer is in its text.
- Score 5: The document is an ideal source: every placeholder and the whole answer come from its text."""

COMPATIBILITY_PROMPT = """# GOAL
Your job is to evaluate a task carried out by an AI system powered by a large language model.
You will be provided with the inputs and output of the task, as well as the evaluation criteria and scoring
rubric. Your task is to evaluate the output of the AI system based on the evaluation criteria and scoring
rubric provided.

# INPUT
Below are the inputs required for performing the task:
<inputs>
<instruction_template>
{template}
</instruction_template>
</inputs>

# OUTPUT
Below is the output of the task, a document retrieved as a source for the template:
<output>
{document}
</output>

# EVALUATION CRITERIA AND SCORING RUBRIC
Here are the evaluation criteria and the rubric that you need to use for evaluating the task:
<evaluation_criteria>
Is the document compatible with the instruction template: could its placeholders be filled with facts
from the document, and the resulting instruction be answered from the document's own text?
</evaluation_criteria>

<scoring_rubric>
{rubric}
</scoring_rubric>

# INSTRUCTIONS FOR THE EVALUATION
1. Understand the task and criteria: read the template, the document and the rubric.
2. Write your feedback in one or two sentences inside <feedback></feedback> tags.
3. Give a score from 1 to 5 inside <score></score> tags.

Please accurately evaluate the task. Strictly adhere to the evaluation criteria and rubric."""


def build_request(
    template: str,
    document: str,
    model: str,
    max_new_tokens: int,
    constrain: bool = True,
    prompt_format: str = "flow_judge",
) -> GenerationRequest:
    """Is `document` a source for `template`? Scored 1..5 like an answer (`judge.parse_output` reads it)."""
    return flow_judge_request(
        COMPATIBILITY_PROMPT.format(
            template=template, document=fencing.judge_view(document), rubric=COMPATIBILITY_RUBRIC
        ),
        model,
        max_new_tokens,
        constrain,
        prompt_format,
    )


def label(score: int, compatible_min: int = 4, incompatible_max: int = 2) -> float | None:
    """1.0 compatible, 0.0 incompatible, None for the uncertain middle (not used as a label)."""
    if incompatible_max >= compatible_min:
        raise ValueError(
            f"incompatible_max_score ({incompatible_max}) must be below compatible_min_score ({compatible_min})"
        )
    if score >= compatible_min:
        return 1.0
    if score <= incompatible_max:
        return 0.0
    return None


def prompt_fingerprint() -> str:
    """Hash of the prompt text as loaded, so an edited or patched prompt makes the labels stale."""
    parts = [COMPATIBILITY_PROMPT, COMPATIBILITY_RUBRIC, inspect.getsource(fencing)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
