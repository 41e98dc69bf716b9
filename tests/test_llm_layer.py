"""The request cache, the decoding grammars on the real embedded tokenizer, and prompt parsing."""

from pathlib import Path

import pytest

from fineinstructions_core.instantiate import document_window, parse_output, template_followed
from fineinstructions_core.judge import parse_output as parse_judge
from fineinstructions_core.llm.base import ChatMessage, GenerationRequest, GenerationResult
from fineinstructions_core.llm.cache import CachedLLM, RequestCache
from fineinstructions_core.llm.constraints import ExcerptCopy, ScoreChoice


class RecordingBackend:
    """A backend that answers from a table; stands in for a model only to count what reaches it."""

    identity = "table-v1"

    def __init__(self):
        self.seen: list[str] = []

    def render(self, request: GenerationRequest) -> str:
        return "|".join(m.content for m in request.messages)

    def generate(self, requests, progress=None, on_result=None):
        out = []
        for i, r in enumerate(requests):
            self.seen.append(self.render(r))
            if "crash" in self.render(r):
                raise ConnectionError("cannot reach the server")
            if "fail" in self.render(r):
                out.append(GenerationResult("", error="TimeoutError: server took too long"))
            else:
                out.append(GenerationResult(self.render(r).upper(), prompt_tokens=3, completion_tokens=2))
            if on_result:
                on_result(i, out[-1])
        return out


def _req(text: str, **kw) -> GenerationRequest:
    return GenerationRequest(model="m", messages=(ChatMessage("user", text),), **kw)


def test_cache_answers_repeats_and_never_stores_failures(tmp_path: Path):
    backend = RecordingBackend()
    llm = CachedLLM(backend, RequestCache(tmp_path / "c.sqlite"))
    first = llm.generate([_req("a"), _req("b"), _req("fail")])
    assert [r.text for r in first] == ["A", "B", ""] and first[2].error
    again = CachedLLM(backend, RequestCache(tmp_path / "c.sqlite"))
    second = again.generate([_req("a"), _req("b", max_new_tokens=7), _req("fail")])
    assert backend.seen == ["a", "b", "fail", "b", "fail"]  # a cached; b has new params; failure retried
    assert again.stats.cache_hits == 1 and again.stats.cache_misses == 2 and again.stats.errors == 1
    assert second[0].cached and second[0].text == "A"
    cache = RequestCache(tmp_path / "c.sqlite")
    assert cache.size()["entries"] == 3 and cache.models() == {"table-v1": 3}
    assert cache.prune(older_than_days=1) == 0
    assert cache.prune(model="table-v1") == 3 and cache.size()["entries"] == 0


def test_answers_finished_before_a_crash_stay_cached(tmp_path: Path):
    backend = RecordingBackend()
    llm = CachedLLM(backend, RequestCache(tmp_path / "c.sqlite"), flush_every=2)
    with pytest.raises(ConnectionError):
        llm.generate([_req("a"), _req("b"), _req("c"), _req("crash"), _req("d")])
    assert RequestCache(tmp_path / "c.sqlite").size()["entries"] == 3  # a, b (flushed early) and c (on the way out)
    backend.seen.clear()
    rerun = CachedLLM(backend, RequestCache(tmp_path / "c.sqlite"))
    results = rerun.generate([_req("a"), _req("b"), _req("c"), _req("d")])
    assert backend.seen == ["d"] and rerun.stats.cache_hits == 3
    assert [r.text for r in results] == ["A", "B", "C", "D"]


@pytest.fixture(scope="module")
def tokenizer():
    import os

    from transformers import AutoTokenizer

    from fineinstructions_core.llm.models import EMBEDDED_LLM, resolve_llm

    path, _ = resolve_llm(EMBEDDED_LLM, Path(os.environ["FI_MODEL_CACHE"]))
    return AutoTokenizer.from_pretrained(path)


def _feed(c, ids):
    for t in ids:
        allowed = c.allowed()
        assert allowed is None or t in allowed, (t, allowed)
        c.advance(t)


def test_excerpt_grammar_copies_the_source_verbatim(tokenizer):
    source = "Run tar -czf backup.tar.gz folder/ to compress a folder. The z option selects gzip."
    eos = tokenizer.eos_token_id
    c = ExcerptCopy(tokenizer, source, eos)
    assert eos in c.banned()  # no empty answer
    _feed(c, tokenizer.encode(" How do I compress a folder?\n", add_special_tokens=False))
    forced = []
    while c.forced:
        forced.append(c.allowed()[0])
        c.advance(forced[-1])
    assert tokenizer.decode(forced) == "Answer: <excerpt>"
    # Inside the excerpt only continuations of the source (or the closing tag) are allowed.
    copy = tokenizer.encode(" The z option", add_special_tokens=False)
    _feed(c, copy)
    nxt = c.allowed()
    assert set(nxt) == {tokenizer.encode(" selects", add_special_tokens=False)[0], c.close_ids[0]}
    c.advance(c.close_ids[0])
    while c.forced:
        c.advance(c.allowed()[0])
    assert c.allowed() == [eos]


def test_template_grammar_forces_the_templates_own_words(tokenizer):
    source = "To compress a folder, run tar -czf backup.tar.gz folder/ in a terminal."
    eos = tokenizer.eos_token_id
    c = ExcerptCopy(tokenizer, source, eos, template="How do I <fi>task</fi> with <fi>tool</fi>?")
    words = tokenizer.encode(" How do I", add_special_tokens=False)
    assert set(c.allowed()) == {words[0], tokenizer.encode(" null", add_special_tokens=False)[0]}
    for t in words:  # the literal is forced token by token
        assert c.allowed()[0] == t
        c.advance(t)
    assert c.allowed() is None and eos in c.banned()  # the slot is the model's
    with_id = tokenizer.encode(" with", add_special_tokens=False)[0]
    assert with_id in c.banned()  # an empty slot is not allowed
    _feed(c, tokenizer.encode(" compress a folder with", add_special_tokens=False))
    _feed(c, tokenizer.encode(" tar", add_special_tokens=False))
    forced = []
    while c.forced:
        forced.append(c.allowed()[0])
        c.advance(forced[-1])
    assert c.allowed() is None  # "?" was not reached: the model may go on with the second slot
    _feed(c, tokenizer.encode("?", add_special_tokens=False))
    text = []
    while c.forced:
        text.append(c.allowed()[0])
        c.advance(text[-1])
    assert tokenizer.decode(text) == "\nAnswer: <excerpt>"
    assert "How do I compress a folder with tar?" in tokenizer.decode(c.instruction)


def test_template_grammar_allows_null(tokenizer):
    eos = tokenizer.eos_token_id
    c = ExcerptCopy(tokenizer, "Some text.", eos, template="when did <fi>event</fi> start")
    null = tokenizer.encode(" null", add_special_tokens=False)
    _feed(c, null)
    assert c.allowed() == [eos]


def test_excerpt_grammar_allows_null(tokenizer):
    c = ExcerptCopy(tokenizer, "Some text.", tokenizer.eos_token_id)
    _feed(c, tokenizer.encode(" null", add_special_tokens=False))
    assert c.banned() == []  # `null` may end the answer


def test_score_grammar_forces_a_score(tokenizer):
    eos = tokenizer.eos_token_id
    c = ScoreChoice(tokenizer, ["1", "2", "3", "4", "5"], eos)
    assert c.banned() == [eos]
    _feed(c, tokenizer.encode("Fine answer.</feedback>", add_special_tokens=False))
    while c.forced:
        c.advance(c.allowed()[0])
    options = c.allowed()
    assert sorted(tokenizer.decode([o]) for o in options) == ["1", "2", "3", "4", "5"]
    c.advance(options[3])
    text = []
    while c.forced:
        text.append(c.allowed()[0])
        c.advance(text[-1])
    assert tokenizer.decode(text) == "</score>" and c.allowed() == [eos]


def test_instantiation_parsing_and_template_following():
    assert parse_output("Instruction: null") is None
    assert parse_output("null.") is None
    p = parse_output("Instruction: How do I compress a folder?\nAnswer: <excerpt>Run tar</excerpt>")
    assert p.instruction == "How do I compress a folder?" and p.answer == "<excerpt>Run tar</excerpt>"
    assert parse_output("Here is a story") == "unparseable"
    assert template_followed("How do I <fi>task</fi> with <fi>tool</fi>?", "How do I compress a folder with tar?")
    assert not template_followed("How do I <fi>task</fi> with <fi>tool</fi>?", "2.1.1. Fast Growing IT Needs")
    assert not template_followed("<fi>error</fi> in <fi>program</fi>", "2.1.1. Fast Growing IT Needs")
    assert template_followed("<fi>error</fi> in <fi>program</fi>", "Syntax error in shell script")


def test_document_window_centres_on_the_chunk():
    text = " ".join(f"w{i}" for i in range(1000))
    start, window = document_window(text, center=len(text) // 2, window_chars=200)
    assert text[start : start + len(window)] == window
    assert abs((start + len(window) / 2) - len(text) / 2) < 120
    assert document_window("short", 3, 200) == (0, "short")


def test_judge_parsing():
    assert parse_judge("<feedback>ok</feedback>\n<score>4</score>") == (4, "ok")
    assert parse_judge("<feedback>ok</feedback> no score") is None


def test_every_match_gets_a_status():
    import pandas as pd

    from fineinstructions_core.instantiate import instantiate_results

    doc = "To create an archive, tar is the usual tool. Run tar -czf backup.tar.gz folder/ to compress a folder."
    outputs = {
        "ok": "Instruction: How do I compress a folder with tar?\nAnswer: <excerpt>Run tar -czf backup.tar.gz "
        "folder/ to compress a folder.</excerpt>",
        "null": "Instruction: null",
        "garbage": "I like turtles",
        "missing": "Instruction: How do I compress a folder with zip?\nAnswer: <excerpt>Use zip -r</excerpt>",
        "short": "Instruction: How do I compress a folder with tar?\nAnswer: <excerpt>tar is the usual tool.</excerpt>",
        "leadin": "Instruction: How do I compress a folder with tar?\nAnswer: Well, as everybody who has ever used a "
        "shell knows very well: <excerpt>Run tar -czf backup.tar.gz folder/</excerpt>",
        "offtemplate": "Instruction: Fast Growing IT Needs\nAnswer: <excerpt>Run tar -czf backup.tar.gz folder/ to "
        "compress a folder.</excerpt>",
        "unfilled": "Instruction: How do I <fi>task</fi> with tar?\nAnswer: <excerpt>Run tar</excerpt>",
        "error": None,
    }
    matches = pd.DataFrame(
        {
            "match_id": list(outputs),
            "document_id": "d",
            "template_id": "t",
            "corpus": "c",
            "template": "How do I <fi>task</fi> with <fi>tool</fi>?",
        }
    )
    results = [GenerationResult(o or "", error=None if o else "RuntimeError: boom") for o in outputs.values()]
    out, rej = instantiate_results(matches, {"d": doc}, [0] * len(outputs), results, 0.8, 4000, min_answer_words=6)
    statuses = dict(zip(rej["match_id"], rej["status"], strict=True)) | dict.fromkeys(out["match_id"], "ok")
    assert statuses == {
        "ok": "ok",
        "null": "null_incompatible",
        "garbage": "unparseable",
        "missing": "excerpt_not_found",
        "short": "answer_too_short",
        "leadin": "excerpt_ratio_below_min",
        "offtemplate": "template_not_followed",
        "unfilled": "unfilled_template",
        "error": "llm_error",
    }
    ((s, e),) = out["excerpt_spans"].iloc[0]
    assert doc[s:e] == out["answer"].iloc[0] and out["excerpt_ratio"].iloc[0] == 1.0
