"""Asking a trained causal LM what it learned: answer likelihood, greedy answers, token F1 and EM.

Every model is asked in the training corpus's own format, `Instruction: {question}\\n\\nAnswer:`, so the
base model, the raw-text baseline and the model trained on instruction pairs are compared on one prompt.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .budget import format_pair

STOPS = ("\nInstruction:", "\n\nInstruction", "\n\n\n")
_STOPWORDS = frozenset(
    "a an the of in on at to for by with from and or is are was were be been what which who whom whose when "
    "where why how did do does that this these those it its as into than then there their".split()
)
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
Progress = Callable[[int, int], None]


def prompt(question: str) -> str:
    """The instruction half of a training text, ending where the answer begins."""
    return format_pair(question, "").rstrip()


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """The best token-overlap F1 against any reference (SQuAD's definition)."""
    best = 0.0
    pred = normalize_answer(prediction).split()
    for ref in references:
        gold = normalize_answer(ref).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if not common:
            continue
        p, r = common / len(pred), common / len(gold)
        best = max(best, 2 * p * r / (p + r))
    return best


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def _content_words(text: str) -> set[str]:
    return {w for w in normalize_answer(text).split() if w not in _STOPWORDS}


def evidence_sentence(question: str, document: str) -> str:
    """The document's sentence sharing most content words with the question (the first on a tie): the
    reference answer when a question set ships without gold answers."""
    sentences = [s.strip() for s in _SENTENCE.split(document) if s.strip()] or [document.strip()]
    words = _content_words(question)
    return max(sentences, key=lambda s: len(words & _content_words(s)))


def cut_answer(text: str) -> str:
    """A greedy continuation up to where a next training text would begin."""
    for stop in STOPS:
        at = text.find(stop)
        if at >= 0:
            text = text[:at]
    return text.strip()


class CausalLM:
    """One model directory loaded once, asked in batches; on the GPU when one is given."""

    def __init__(self, model_dir: Path, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False).input_ids

    def answer_logprob(
        self,
        prompts: Sequence[str],
        answers: Sequence[str],
        batch_size: int = 8,
        progress: Progress | None = None,
    ) -> list[float]:
        """Mean per-token log-likelihood of each answer (preceded by a space) after its prompt."""
        import torch

        rows = [(self._ids(p), self._ids(" " + a)) for p, a in zip(prompts, answers, strict=True)]
        out: list[float] = []
        pad = self.tokenizer.pad_token_id
        for b in range(0, len(rows), batch_size):
            chunk = rows[b : b + batch_size]
            width = max(len(p) + len(a) for p, a in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (p, a) in enumerate(chunk):
                ids[r, : len(p) + len(a)] = torch.tensor(p + a)
                mask[r, : len(p) + len(a)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for r, (p, a) in enumerate(chunk):
                positions = torch.arange(len(p) - 1, len(p) + len(a) - 1)  # each answer token's predictor
                target = torch.tensor(a)
                out.append(float(logprobs[r, positions, target].mean()))
            if progress:
                progress(len(out), len(rows))
        return out

    def greedy(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        batch_size: int = 8,
        min_new_tokens: int = 0,
        progress: Progress | None = None,
    ) -> list[str]:
        """Greedy continuations of at least `min_new_tokens`, cut where the next training text would begin."""
        import torch

        tok = self.tokenizer
        tok.padding_side = "left"
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: list[str] = [""] * len(prompts)
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = self.model.generate(
                    input_ids=enc.input_ids.to(self.device),
                    attention_mask=enc.attention_mask.to(self.device),
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=min(min_new_tokens, max_new_tokens),
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
            for row, i in enumerate(idx):
                text = tok.decode(gen[row, enc.input_ids.shape[1] :], skip_special_tokens=True)
                answers[i] = cut_answer(text)
            if progress:
                progress(min(b + batch_size, len(order)), len(order))
        return answers

    def close(self) -> Any:
        del self.model
