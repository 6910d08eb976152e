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
