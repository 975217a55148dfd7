"""Build (and load) the offline lm-eval tasks ``pydoc_cloze`` and ``pydoc_choice``.

Corpus: Python's bundled documentation, ``pydoc_data.topics.topics``, joined in sorted key order with
``"\\n\\n"`` — the embedded corpus of ptq's perplexity protocol, which calibrates on the first 70% of its tokens
and evaluates on the last 30%. To keep the task items out of the calibration part, they come only from topics
that *start* at or after 70% of the joined string's characters. The character split stands in for the token
split; the topic that straddles it is left out, which leaves a margin (with SmolLM2's tokenizer the 70% token
boundary falls at 69.96% of the characters, the first topic used starts at 71.07%).

From those topics, prose paragraphs (no code, tables, headings, lists or version notes) are unwrapped and cut
into sentences, and two tasks are built, both shuffled with ``SEED`` so that lm-eval's ``limit`` (the first N
items) takes a mix of topics:

* ``pydoc_cloze`` — LAMBADA-style last-word prediction: a passage of consecutive sentences of one topic
  (``CLOZE_WORDS`` words) whose final word is alphabetic and at least 3 letters long; context = the passage up to
  that word, target = ``" " + word`` (its full stop dropped). Scored like lm-eval's ``lambada_openai``: ``acc``
  (the target is the greedy continuation) and ``perplexity``. Every qualifying sentence ends one passage, so
  passages overlap; the task is therefore pinned zero-shot.
* ``pydoc_choice`` — the start of a sentence and four continuations: the true one and the continuations of
  three other sentences of similar length, scored with ``acc`` and ``acc_norm``.

``python -m ptq.eval.tasks.build`` rewrites the task YAMLs and JSONL files beside this module; they are a pure
function of the corpus and ``SEED`` (the YAMLs record the corpus' sha256). lm-eval imports this file by path
for ``custom_dataset: !function build.load_split``, so it imports nothing from ptq.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent
SEED = 0
EVAL_FRACTION = 0.3
CLOZE_WORDS = (50, 150)
CHOICE_WORDS = (8, 40)
N_CHOICES = 4

_HEADING = re.compile(r"^[*=\-^~]{3,}$")
_MARKUP = re.compile(r"\|\||\+-|>>>|::")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CLOZE_END = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]{3,})\.$", re.DOTALL)
_NOTES = ("Changed in version", "New in version", "Added in version", "Deprecated", "Note:", "See also")


def corpus() -> str:
    """The embedded corpus: every pydoc topic, in sorted key order, joined with a blank line."""
    return "\n\n".join(topics[key] for key in sorted(topics))


def corpus_sha256() -> str:
    """Fingerprint of the running interpreter's corpus (it changes between Python releases)."""
    return hashlib.sha256(corpus().encode()).hexdigest()


def eval_topics() -> list[str]:
    """Topic names that lie wholly in the last ``EVAL_FRACTION`` of the corpus, by character position."""
    keys = sorted(topics)
    cut = (1 - EVAL_FRACTION) * len(corpus())
    names, start = [], 0
    for key in keys:
        if start >= cut:
            names.append(key)
        start += len(topics[key]) + 2
    return names


def prose_paragraphs(text: str) -> Iterator[str]:
    """Paragraphs of running text, unwrapped to one line: blocks of one indentation level that read as prose."""
    for block in re.split(r"\n\s*\n", text):
        lines = textwrap.dedent(block).strip("\n").split("\n")
        if any(line[:1].isspace() or _HEADING.match(line.strip()) for line in lines):
            continue  # code, a nested list or table, or a section heading
        paragraph = " ".join(" ".join(line.split()) for line in lines)
        reads_as_prose = paragraph[:1].isupper() and paragraph.endswith(".") and not _MARKUP.search(paragraph)
        if reads_as_prose and not paragraph.startswith(_NOTES):
            yield paragraph


def topic_sentences() -> list[list[str]]:
    """Per evaluation topic, its prose sentences in order; a sentence seen in an earlier topic is dropped."""
    seen: set[str] = set()
    result = []
    for name in eval_topics():
        sentences = []
        for paragraph in prose_paragraphs(topics[name]):
            for sentence in _SENTENCE_END.split(paragraph):
                if sentence not in seen:
                    seen.add(sentence)
                    sentences.append(sentence)
        result.append(sentences)
    return result


def cloze_items(sentences_by_topic: list[list[str]]) -> list[dict[str, str]]:
    """One item per sentence ending in an alphabetic word: the longest run of sentences that fits CLOZE_WORDS."""
    low, high = CLOZE_WORDS
    items = []
    for sentences in sentences_by_topic:
        for end, sentence in enumerate(sentences):
            if not _CLOZE_END.match(sentence):
                continue
            start, words = end, len(sentence.split())
            while start > 0 and words + len(sentences[start - 1].split()) <= high:
                start -= 1
                words += len(sentences[start].split())
            if low <= words <= high:
                match = _CLOZE_END.match(" ".join(sentences[start : end + 1]))
                items.append({"context": match["context"], "target": " " + match["word"]})
    return items


def choice_items(sentences_by_topic: list[list[str]], rng: random.Random) -> list[dict[str, Any]]:
    """Split each mid-length sentence at a random word; distractors are tails of sentences of similar length."""
    low, high = CHOICE_WORDS
    splits = []
    for sentence in (s for sentences in sentences_by_topic for s in sentences):
        words = sentence.split()
        if low <= len(words) <= high:
            cut = rng.randint(len(words) // 3, (2 * len(words)) // 3)
            splits.append((" ".join(words[:cut]), " ".join(words[cut:])))
    items = []
    for index, (context, true_tail) in enumerate(splits):
        size = len(true_tail.split())
        others = {tail for i, (_, tail) in enumerate(splits) if i != index and tail != true_tail}
        ranked = sorted(others, key=lambda tail: (abs(len(tail.split()) - size), tail))
        choices = rng.sample(ranked[: 4 * N_CHOICES], N_CHOICES - 1)
        label = rng.randrange(N_CHOICES)
        choices.insert(label, true_tail)
        items.append({"context": context, "choices": choices, "label": label})
    return items


def task_yaml(name: str, body: str) -> str:
    """A task YAML whose data are ``<name>.jsonl`` beside it, read through :func:`load_split`."""
    return (
        "# Generated by ptq/eval/tasks/build.py: change that file and rerun it, do not edit this one.\n"
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files: {name}.jsonl\n"
        "custom_dataset: !function build.load_split\n"
        "test_split: test\n"
        f"{body}"
        f"metadata:\n  version: 1.0\n  corpus_sha256: {corpus_sha256()}\n"
    )


# Cloze passages overlap (each is the run of sentences before its own target), so a few-shot example drawn from
# the same items could show another item's answer: the task is pinned zero-shot, as lambada_openai is run.
CLOZE_YAML = """output_type: loglikelihood
num_fewshot: 0
doc_to_text: context
doc_to_target: target
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

CHOICE_YAML = """output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(out_dir: Path = TASKS_DIR) -> list[Path]:
    """Write both tasks' YAML and JSONL files into ``out_dir``; returns the paths written."""
    rng = random.Random(SEED)
    sentences = topic_sentences()
    tasks = {
        "pydoc_cloze": (CLOZE_YAML, cloze_items(sentences)),
        "pydoc_choice": (CHOICE_YAML, choice_items(sentences, rng)),
    }
    paths = []
    for name, (body, items) in tasks.items():
        rng.shuffle(items)
        data = out_dir / f"{name}.jsonl"
        data.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
        spec = out_dir / f"{name}.yaml"
        spec.write_text(task_yaml(name, body), encoding="utf-8")
        paths += [spec, data]
    return paths


def load_split(data_files: str, **metadata: Any) -> Any:
    """lm-eval ``custom_dataset`` hook: the JSONL file named relative to this folder, as a one-split DatasetDict.

    lm-eval passes the task's ``dataset_kwargs`` and ``metadata`` as keyword arguments; only ``data_files`` is used.
    """
    import datasets

    lines = (TASKS_DIR / data_files).read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines])})


if __name__ == "__main__":
    for path in write_tasks():
        print(f"{path}: {path.stat().st_size / 1024:.0f} KiB")
