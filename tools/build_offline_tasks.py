"""Builds wandapp's offline zero-shot tasks from Northanger Abbey (the bundled novel that is never
used for calibration by default) in lm-evaluation-harness's own task format: one YAML file and
one JSONL file per task, in ``python/wandapp/data/tasks/``.

    python tools/build_offline_tasks.py            # rewrites the shipped files (seeded: the same bytes every run)
    python tools/build_offline_tasks.py --out DIR --items 100 --seed 1

Only the data is built here: prompts, scoring and metrics are the harness's (the YAML files name
its ``multiple_choice`` and ``loglikelihood`` output types and its ``acc``, ``acc_norm`` and
``perplexity`` metrics). Standard library only; how the items are chosen, how many, and the
chance levels are written to ``README.md`` beside the tasks (and printed).

austen_next_sentence (multiple choice, 4 options, chance 25%)
    Context: two consecutive sentences of one chapter (80-300 characters). Options: the sentence that follows them,
    and three sentences drawn from elsewhere in the book (at least 50 sentences away), each within
    20% of the true sentence's length in characters, so that length does not give the answer
    away. The true sentence's position among the four is drawn uniformly.

austen_last_word (last word, LAMBADA-style)
    A passage whose final word is to be predicted from the rest, as in LAMBADA (Paperno et al.
    2016): the longest run of whole consecutive sentences of one chapter, ending at a sentence's
    end, of at most 90 words (25 at least). Its final word is alphabetic, is not among the book's
    50 most frequent words, and occurs earlier in the passage (the context determines it; LAMBADA
    selected its passages by human guessers). No two items end within 5 sentences of each other. Scored as ``lambada_openai`` is: ``acc`` (the word is the model's greedy
    continuation, every token of it) and ``perplexity`` of the word.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import random
import re
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "python", "wandapp", "data", "austen_northangerabbey.txt.gz")
OUT = os.path.join(ROOT, "python", "wandapp", "data", "tasks")

#: Tokens ending in a period that do not end a sentence (the only ones in the novel).
ABBREVIATIONS = {"Mr.", "Mrs.", "Dr.", "St.", "Vol."}
CONTEXT_SENTENCES = 2  # austen_next_sentence: sentences of context
CONTEXT_CHARS = (80, 300)  # austen_next_sentence: characters of context
TARGET_CHARS = (30, 150)  # austen_next_sentence: characters of the true sentence
CHOICES = 4
DISTRACTOR_DISTANCE = 50  # sentences between the true one and any distractor
LENGTH_TOLERANCE = 0.2  # distractor length within 20% of the true sentence's (characters)
PASSAGE_WORDS = (25, 90)  # austen_last_word: words per passage
ITEM_GAP = 3  # austen_last_word: sentences between the final sentences of two items
FREQUENT_WORDS = 50  # austen_last_word: targets are not among the book's most frequent words


@dataclass
class Sentence:
    text: str
    chapter: int


def sentences(text: str) -> list[Sentence]:
    """The novel's sentences from CHAPTER 1 on, in order, with their chapter. Paragraphs are
    split on blank lines and their lines joined with spaces; a sentence ends at ``.``, ``!`` or
    ``?`` (closing quotes included) followed by a space and a capital letter or an opening quote,
    except after the abbreviations in ABBREVIATIONS."""
    out: list[Sentence] = []
    chapter = 0
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = re.sub(r"\s+", " ", paragraph).strip()
        heading = re.fullmatch(r"CHAPTER (\d+)", paragraph)
        if heading:
            chapter = int(heading.group(1))
            continue
        if not paragraph or chapter == 0:  # title page and the author's advertisement
            continue
        start = 0
        for end in re.finditer(r"[.!?]['\"]*(?= ['\"]?[A-Z])", paragraph):
            last_token = paragraph[:end.start() + 1].rsplit(" ", 1)[-1].lstrip("\"'")
            if last_token in ABBREVIATIONS:
                continue
            out.append(Sentence(paragraph[start:end.end()].strip(), chapter))
            start = end.end()
        if paragraph[start:].strip():
            out.append(Sentence(paragraph[start:].strip(), chapter))
    return out


def next_sentence_items(sents: list[Sentence], n: int, rng: random.Random) -> list[dict]:
    """``n`` items of austen_next_sentence at non-overlapping positions, in a seeded random order."""
    def usable(i: int) -> bool:
        window = sents[i - CONTEXT_SENTENCES : i + 1]
        context = " ".join(s.text for s in window[:-1])
        target = sents[i].text
        return (
            len({s.chapter for s in window}) == 1
            and CONTEXT_CHARS[0] <= len(context) <= CONTEXT_CHARS[1]
            and TARGET_CHARS[0] <= len(target) <= TARGET_CHARS[1]
            and len(target.split()) >= 6
        )

    positions = [i for i in range(CONTEXT_SENTENCES, len(sents)) if usable(i)]
    rng.shuffle(positions)
    taken: set[int] = set()
    items = []
    for i in positions:
        span = set(range(i - CONTEXT_SENTENCES, i + 1))
        if span & taken:
            continue
        target = sents[i].text
        low, high = len(target) * (1 - LENGTH_TOLERANCE), len(target) * (1 + LENGTH_TOLERANCE)
        pool = sorted({
            s.text for j, s in enumerate(sents)
            if abs(j - i) >= DISTRACTOR_DISTANCE and low <= len(s.text) <= high and s.text != target
        })
        if len(pool) < CHOICES - 1:
            continue
        choices = rng.sample(pool, CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices.insert(label, target)
        context = " ".join(s.text for s in sents[i - CONTEXT_SENTENCES : i])
        items.append({"id": len(items), "sentence": i, "context": context, "choices": choices, "label": label})
        taken |= span
        if len(items) == n:
            return items
    raise SystemExit(f"only {len(items)} next-sentence items fit; ask for fewer")


_FINAL_WORD = re.compile(r"^(?P<context>.*) (?P<word>[A-Za-z]+)[.!?]['\"]*$", re.S)


def last_word_items(sents: list[Sentence], n: int, rng: random.Random) -> tuple[list[dict], list[str]]:
    """``n`` items of austen_last_word in a seeded random order (no two ending within
    ITEM_GAP sentences of each other), and the book's FREQUENT_WORDS most frequent words
    (excluded as targets)."""
    counts = collections.Counter(w.lower() for s in sents for w in re.findall(r"[A-Za-z]+", s.text))
    frequent = [w for w, _ in counts.most_common(FREQUENT_WORDS)]
    candidates = []
    for last in range(len(sents)):  # the longest run of whole sentences of the chapter ending here, <= max words
        first, words = last, len(sents[last].text.split())
        while (
            first > 0 and sents[first - 1].chapter == sents[last].chapter
            and words + len(sents[first - 1].text.split()) <= PASSAGE_WORDS[1]
        ):
            first -= 1
            words += len(sents[first].text.split())
        if words < PASSAGE_WORDS[0]:
            continue
        match = _FINAL_WORD.match(" ".join(s.text for s in sents[first : last + 1]))
        if not match:
            continue
        word, context = match.group("word"), match.group("context")
        if word.lower() in frequent or not re.search(rf"\b{word}\b", context):
            continue
        candidates.append((last, context, word))
    rng.shuffle(candidates)
    ends: list[int] = []
    items = []
    for last, context, word in candidates:
        if any(abs(last - end) < ITEM_GAP for end in ends):
            continue
        items.append({"id": len(items), "sentence": last, "context": context, "target": word})
        ends.append(last)
        if len(items) == n:
            return items, frequent
    raise SystemExit(f"only {len(items)} last-word items fit; ask for fewer")


def last_word_baselines(items: list[dict]) -> tuple[float, str, float]:
    """(accuracy of always answering the most frequent target, that target, expected accuracy of
    answering a word of the context drawn uniformly from its distinct words): the chance levels."""
    target, count = collections.Counter(it["target"] for it in items).most_common(1)[0]
    copy = sum(1 / len(set(re.findall(r"[A-Za-z]+", it["context"]))) for it in items) / len(items)
    return count / len(items), target, copy


#: The harness's task configurations, without their ``metadata`` (added by :func:`yaml_text`).
YAML = {
    "austen_next_sentence": """\
# Built by tools/build_offline_tasks.py (see README.md here); loaded offline by wandapp.
task: austen_next_sentence
tag: austen
custom_dataset: !function offline.load_austen_next_sentence
test_split: test
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""",
    "austen_last_word": """\
# Built by tools/build_offline_tasks.py (see README.md here); loaded offline by wandapp.
task: austen_last_word
tag: austen
custom_dataset: !function offline.load_austen_last_word
test_split: test
output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{' ' + target}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
}

def yaml_text(name: str, chance: dict[str, float]) -> str:
    """The task's YAML file: YAML[name] and ``metadata`` with the version and the chance level
    of each accuracy metric (which wandapp.eval.tasks shows beside the values)."""
    levels = "".join(f"    {metric}: {value}\n" for metric, value in chance.items())
    return YAML[name] + f"metadata:\n  version: 1.0\n  chance:\n{levels}"


LOADER = '''\
"""Loads wandapp's offline tasks for lm-evaluation-harness (named by ``custom_dataset`` in the
YAML files beside this one): the JSONL file next to this module, read into memory as a
``datasets.DatasetDict`` with one ``test`` split. Nothing is downloaded or cached on disk.
Written by tools/build_offline_tasks.py."""

import json
import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(task):
    with open(os.path.join(HERE, task + ".jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_austen_next_sentence(**_harness_kwargs):
    return _load("austen_next_sentence")


def load_austen_last_word(**_harness_kwargs):
    return _load("austen_last_word")
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200, help="items per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    text = gzip.decompress(open(SOURCE, "rb").read()).decode("utf-8")
    sents = sentences(text)
    next_items = next_sentence_items(sents, args.items, random.Random(args.seed))
    last_items, frequent = last_word_items(sents, args.items, random.Random(args.seed + 1))
    majority, majority_word, copy = last_word_baselines(last_items)
    os.makedirs(args.out, exist_ok=True)
    chance = {
        "austen_next_sentence": {"acc": 1 / CHOICES, "acc_norm": 1 / CHOICES},
        "austen_last_word": {"acc": round(max(majority, copy), 3)},
    }
    for name, items in (("austen_next_sentence", next_items), ("austen_last_word", last_items)):
        with open(os.path.join(args.out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        with open(os.path.join(args.out, f"{name}.yaml"), "w", encoding="utf-8") as f:
            f.write(yaml_text(name, chance[name]))
    with open(os.path.join(args.out, "offline.py"), "w", encoding="utf-8") as f:
        f.write(LOADER)
    label_counts = collections.Counter(it["label"] for it in next_items)
    readme = f"""\
# Offline zero-shot tasks (lm-evaluation-harness format)

Two small tasks built from *Northanger Abbey* (Jane Austen; public domain; the bundled novel that
wandapp never calibrates on by default) by `tools/build_offline_tasks.py --items {args.items} --seed {args.seed}`,
so that zero-shot accuracy can be measured with no network. Each task is a YAML file in the
harness's own format, a JSONL file of items, and `offline.py`, which reads the JSONL file next to
it into memory (`custom_dataset`). Prompts, scoring and metrics are lm-evaluation-harness's.
Use them with `wandapp.eval.tasks(model, tokenizer, ["austen_next_sentence", "austen_last_word"])`
(or the tag `austen`), `wandapp eval --tasks austen`, or the harness itself:
`lm_eval --model hf --model_args pretrained=DIR --include_path {os.path.relpath(OUT, ROOT)} --tasks austen`.

The text is split into {len(sents)} sentences (chapters 1-31; paragraphs joined, a sentence ends at
`.`, `!` or `?` before a capital letter or an opening quote, not after Mr., Mrs., Dr., St., Vol.).
The items' order is seeded-random, so the harness's `limit=k` (the first k items) is a random
sample.

## austen_next_sentence: {len(next_items)} items, multiple choice, chance 25%

Context: {CONTEXT_SENTENCES} consecutive sentences of one chapter ({CONTEXT_CHARS[0]}-{CONTEXT_CHARS[1]} characters; no two items
share a sentence). Choices: the sentence that follows them ({TARGET_CHARS[0]}-{TARGET_CHARS[1]} characters, 6 words or more) and {CHOICES - 1} sentences drawn
from elsewhere in the book (at least {DISTRACTOR_DISTANCE} sentences away), each within
{LENGTH_TOLERANCE:.0%} of the true sentence's length in characters, so that length gives nothing
away. The true sentence's position is drawn uniformly (positions 0-3: {[label_counts[k] for k in range(CHOICES)]}).
Metrics: `acc` (the choice of highest log-likelihood after the context is the true one) and
`acc_norm` (log-likelihood per byte). Chance: 25% for both.

## austen_last_word: {len(last_items)} items, last word (LAMBADA-style)

A passage whose final word the model must predict from the rest: the longest run of whole
consecutive sentences of one chapter ending at a sentence's end with at most {PASSAGE_WORDS[1]} words
(at least {PASSAGE_WORDS[0]}); no two items end within {ITEM_GAP} sentences of each other (their
passages may overlap, their final sentences differ). The final word is alphabetic,
not among the book's {FREQUENT_WORDS} most frequent words, and occurs earlier in the passage (the
context determines it, as LAMBADA's human-filtered passages do). Context: the passage up to
that word; target: the word with its leading space (its final punctuation dropped), as
`lambada_openai`. Metrics: `acc` (the word is the model's greedy continuation, all its tokens)
and `perplexity` (of the word's tokens given the context). Chance for `acc`: about
1 / vocabulary size for a guess, {majority:.1%} for always answering the most frequent target
("{majority_word}"), {copy:.1%} for a word drawn uniformly from the distinct words of the context
(which always holds the answer): the baseline to beat is {max(majority, copy):.1%} (the chance
level in the YAML file's metadata).
"""
    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8") as f:
        f.write(readme)
    print(readme)


if __name__ == "__main__":
    main()
