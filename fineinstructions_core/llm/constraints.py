"""Structured decoding as token masks: a small model keeps the protocol because it cannot break it.

`ExcerptCopy`: inside `<excerpt>...</excerpt>` the only tokens allowed are those that continue a
verbatim copy of the source document's token sequence, or that start the closing tag. The grounding
rule is then met by construction instead of hoped for; the excerpt expander still verifies every span.
Protocol markup inside the source (`</excerpt>`, `<fi>`, `<score>`, `<...>`, `<|im_end|>`, see
`fencing.py`) is never copied: a copy that reaches it can only close, so a document cannot end an
excerpt early and turn its own text into free answer text.

`ScoreChoice`: once the judge closes `</feedback>`, it must write `<score>N</score>` with N one of the
options, so an answer always carries a parseable score.

Both are state machines over generated token ids, independent of any backend; the transformers
backend applies them as a logits processor.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Protocol

from ..fencing import markup_spans


class TokenizerLike(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class Constraint(Protocol):
    def allowed(self) -> list[int] | None:
        """Token ids allowed next, or None for no restriction."""

    def banned(self) -> list[int]:
        """Token ids never allowed next (used when `allowed` is None)."""

    def advance(self, token_id: int) -> None: ...

    def force_finish(self) -> None:
        """The token budget is nearly spent: close whatever structure is open."""

    def reserve(self) -> int:
        """Tokens to keep in hand for `force_finish`."""


class ExcerptCopy:
    """The instantiation grammar: `Instruction: <one line>\nAnswer: <excerpt>COPY</excerpt>` or `null`.

    Phases: the instruction, then the forced `Answer: <excerpt>`, then a verbatim copy of the source
    (token by token, following every place in the source the copy so far could come from), then the forced
    `</excerpt>` and end of text. Given the template, the instruction is the template itself: its own words
    are forced and the model writes only the `<fi>` slots (each ends where the model starts the next
    literal, or after `max_slot_tokens`); its first token may instead begin `null`. Without a template the
    instruction is one free line of at most `max_instruction_tokens`.
    """

    OPEN = "<excerpt>"
    CLOSE = "</excerpt>"

    def __init__(
        self,
        tokenizer: TokenizerLike,
        source: str,
        eos_id: int,
        max_excerpt_tokens: int = 80,
        max_instruction_tokens: int = 48,
        template: str | None = None,
        max_slot_tokens: int = 10,
    ):
        self.tok = tokenizer
        self.eos_id = eos_id
        self.source_ids = _source_ids(tokenizer, source)
        self.close_ids = tokenizer.encode(self.CLOSE, add_special_tokens=False)
        self.max_excerpt_tokens = max_excerpt_tokens
        self.max_instruction_tokens = max_instruction_tokens
        # An excerpt may start on a word without its leading space: map the spaceless variant too.
        self.starts: dict[int, list[int]] = defaultdict(list)
        for i, t in enumerate(self.source_ids):
            if t == BLOCKED:
                continue
            self.starts[t].append(i)
            bare = self._spaceless(t)
            if bare is not None and bare != t:
                self.starts[bare].append(i)
        self.instruction: list[int] = []
        self.phase = "instruction"  # instruction -> excerpt -> done
        self.positions: list[int] | None = None  # next source index for each live alignment
        self.copied = 0
        self.forced: list[int] = []
        self.after_forced = "excerpt"
        self.max_slot_tokens = max_slot_tokens
        self.segments = _template_segments(template) if template else None
        self.seg = 0
        self.slot_tokens = 0
        self.in_slot = False
        self.first = True
        self.null_ids = tokenizer.encode(" null", add_special_tokens=False)
        self.newlines = _newline_ids(tokenizer)
        # Each literal is tokenized once here, not at every decoding step.
        self.literal_ids = [
            tokenizer.encode(text.rstrip() if i > 0 else " " + text.strip(), add_special_tokens=False)
            if kind == "lit"
            else []
            for i, (kind, text) in enumerate(self.segments or [])
        ]
        if self.segments is not None:
            self._next_segment()

    def _literal_ids(self, i: int) -> list[int]:
        return self.literal_ids[i]

    def _next_segment(self) -> None:
        """Enter segment `self.seg`: force a literal, open a slot, or finish the instruction."""
        self.in_slot = False
        if self.seg >= len(self.segments):
            self._force("\nAnswer: " + self.OPEN, then="excerpt")
            return
        kind, _ = self.segments[self.seg]
        if kind == "lit":
            ids = self._literal_ids(self.seg)
            self.seg += 1
            if ids:
                self.forced, self.after_forced = list(ids), "segment"
            else:
                self._next_segment()
        else:
            self.seg += 1
            self.in_slot, self.slot_tokens = True, 0

    def _next_literal_first(self) -> int | None:
        if self.seg < len(self.segments) and self.segments[self.seg][0] == "lit":
            ids = self._literal_ids(self.seg)
            return ids[0] if ids else None
        return None

    def _spaceless(self, token_id: int) -> int | None:
        text = self.tok.decode([token_id])
        if not text.startswith(" ") or len(text) < 2:
            return None
        ids = self.tok.encode(text[1:], add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    def allowed(self) -> list[int] | None:
        if self.forced:
            if self.first and self.segments is not None and self.after_forced == "segment":
                return [self.forced[0], self.null_ids[0]]  # start the template, or answer null
            return [self.forced[0]]
        if self.phase == "done":
            return [self.eos_id]
        if self.phase == "instruction":
            return None
        if self.positions is None:
            return list(self.starts)
        nxt = {self.source_ids[p] for p in self.positions if p < len(self.source_ids)} - {BLOCKED}
        if not nxt or self.copied >= self.max_excerpt_tokens:
            return [self.close_ids[0]]
        return list(nxt) + [self.close_ids[0]]

    def banned(self) -> list[int]:
        if self.phase != "instruction":
            return []
        if self.segments is None:
            return [] if self.tok.decode(self.instruction).strip().lower() == "null" else [self.eos_id]
        banned = [self.eos_id]
        last_slot = self.seg >= len(self.segments)
        if self.in_slot and not last_slot:
            banned += self.newlines  # a slot is filled on the instruction's own line
        nxt = self._next_literal_first()
        if self.in_slot and self.slot_tokens == 0 and nxt is not None:
            banned.append(nxt)  # no empty slot
        return banned

    def _force(self, text: str, then: str) -> None:
        self.forced = self.tok.encode(text, add_special_tokens=False)
        self.after_forced = then

    def advance(self, token_id: int) -> None:
        if self.forced:
            if self.first and self.segments is not None and token_id != self.forced[0]:
                self.first = False  # the model chose `null` over the template
                self.forced, self.after_forced = self.null_ids[1:], "done"
                if not self.forced:
                    self.phase = "done"
                return
            self.first = False
            if self.phase == "instruction":
                self.instruction.append(token_id)
            self.forced.pop(0)
            if not self.forced:
                if self.after_forced == "segment":
                    self._next_segment()
                    return
                self.phase = self.after_forced
                if self.phase == "excerpt":
                    self.positions, self.copied = None, 0
            return
        if self.phase == "instruction" and self.segments is not None:
            if self.first and token_id == self.null_ids[0]:
                self.first = False  # a template that starts with a slot: `null` is still an answer
                self.forced, self.after_forced = self.null_ids[1:], "done"
                if not self.forced:
                    self.phase = "done"
                return
            self.first = False
            self.instruction.append(token_id)
            self.slot_tokens += 1
            nxt = self._next_literal_first()
            last_slot = self.seg >= len(self.segments)
            if nxt is not None and token_id == nxt and self.slot_tokens > 1:
                # The model began the template's next words: the slot is filled; force the rest of them.
                ids = self._literal_ids(self.seg)
                self.seg += 1
                self.in_slot = False
                self.forced, self.after_forced = ids[1:], "segment"
                if not self.forced:
                    self._next_segment()
            elif last_slot and "\n" in self.tok.decode([token_id]):
                self._force("Answer: " + self.OPEN, then="excerpt")
            elif self.slot_tokens >= self.max_slot_tokens:
                self._next_segment()
            return
        if self.phase == "instruction":
            before = self.tok.decode(self.instruction).strip()
            self.instruction.append(token_id)
            if "\n" in self.tok.decode([token_id]) and before:
                # The instruction line is finished (leading blank lines are ignored).
                if before.lower() == "null":
                    self.phase = "done"
                else:
                    self._force("Answer: " + self.OPEN, then="excerpt")
            elif len(self.instruction) >= self.max_instruction_tokens:
                self._force("\nAnswer: " + self.OPEN, then="excerpt")
            return
        if self.phase == "excerpt":
            if token_id == self.close_ids[0] and not self._continues(token_id):
                self._force(self.CLOSE, then="done")
                self.forced.pop(0)
                if not self.forced:
                    self.phase = "done"
                return
            if self.positions is None:
                self.positions = [p + 1 for p in self.starts.get(token_id, [])]
            else:
                self.positions = [
                    p + 1 for p in self.positions if p < len(self.source_ids) and self.source_ids[p] == token_id
                ]
            self.copied += 1

    def force_finish(self) -> None:
        if self.forced:
            return
        if self.phase == "excerpt" and self.positions is not None:
            self._force(self.CLOSE, then="done")
        elif self.phase == "instruction":
            self.phase = "done"

    def reserve(self) -> int:
        return len(self.close_ids) + 1

    def _continues(self, token_id: int) -> bool:
        return any(p < len(self.source_ids) and self.source_ids[p] == token_id for p in self.positions or [])


class ScoreChoice:
    """Free text until `</feedback>`, then forced `<score>`, one option, `</score>`, end of text."""

    def __init__(self, tokenizer: TokenizerLike, options: Sequence[str], eos_id: int):
        self.tok = tokenizer
        self.option_ids = [tokenizer.encode(o, add_special_tokens=False)[0] for o in options]
        self.eos_id = eos_id
        self.generated: list[int] = []
        self.forced: list[int] = []
        self.phase = "free"  # free -> (forced) -> choose -> (forced) -> done
        self.after_forced = "choose"

    def allowed(self) -> list[int] | None:
        if self.forced:
            return [self.forced[0]]
        if self.phase == "done":
            return [self.eos_id]
        if self.phase == "choose":
            return self.option_ids
        return None

    def banned(self) -> list[int]:
        return [self.eos_id] if self.phase == "free" and not self.forced else []

    def advance(self, token_id: int) -> None:
        self.generated.append(token_id)
        if self.forced:
            self.forced.pop(0)
            if not self.forced:
                self.phase = self.after_forced
            return
        if self.phase == "choose":
            self._force("</score>", then="done")
            return
        if self.phase == "free":
            tail = self.tok.decode(self.generated[-12:])
            if tail.endswith("<score>"):
                self.phase = "choose"
            elif tail.endswith("</feedback>"):
                self._force("\n<score>", then="choose")

    def force_finish(self) -> None:
        """Called when the token budget is nearly spent: close the feedback and ask for the score."""
        if self.phase == "free" and not self.forced:
            self._force("</feedback>\n<score>", then="choose")

    def reserve(self) -> int:
        return 12

    def _force(self, text: str, then: str) -> None:
        self.forced = self.tok.encode(text, add_special_tokens=False)
        self.after_forced = then


BLOCKED = -1  # a source position holding protocol markup: no copy goes through it

_TAG = re.compile(r"<fi>.*?</fi>", re.DOTALL)
_NEWLINES: dict[int, list[int]] = {}


def _source_ids(tokenizer: TokenizerLike, source: str) -> list[int]:
    """The source's tokens, each piece of protocol markup replaced by one BLOCKED position (the text
    between markup is tokenized on its own; a source without markup tokenizes exactly as before)."""
    spans = markup_spans(source)
    if not spans:
        return tokenizer.encode(source, add_special_tokens=False)
    ids: list[int] = []
    pos = 0
    for s, e in spans:
        if s > pos:
            ids += tokenizer.encode(source[pos:s], add_special_tokens=False)
        ids.append(BLOCKED)
        pos = e
    if pos < len(source):
        ids += tokenizer.encode(source[pos:], add_special_tokens=False)
    return ids


def _template_segments(template: str) -> list[tuple[str, str]]:
    """'how to <fi>x</fi> fast' -> [('lit', 'how to '), ('slot', ''), ('lit', ' fast')]."""
    out: list[tuple[str, str]] = []
    pos = 0
    for m in _TAG.finditer(template):
        if template[pos : m.start()].strip():
            out.append(("lit", template[pos : m.start()]))
        out.append(("slot", ""))
        pos = m.end()
    if template[pos:].strip():
        out.append(("lit", template[pos:]))
    return out


def _newline_ids(tokenizer: Any) -> list[int]:
    """Every vocabulary token that contains a line break (computed once per tokenizer)."""
    key = id(tokenizer)
    if key not in _NEWLINES:
        size = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
        _NEWLINES[key] = [i for i in range(size) if "\n" in tokenizer.decode([i])]
    return _NEWLINES[key]


def build_constraint(spec: tuple[str, ...] | None, tokenizer: Any, eos_id: int) -> Constraint | None:
    if not spec:
        return None
    kind, *args = spec
    if kind == "excerpt_copy":
        return ExcerptCopy(tokenizer, args[0], eos_id, template=args[1] if len(args) > 1 else None)
    if kind == "score":
        return ScoreChoice(tokenizer, args, eos_id)
    raise ValueError(f"unknown decoding constraint {kind!r}")
