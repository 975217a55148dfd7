"""lm-eval harness on an in-memory model: the offline pydoc tasks run, names fail with one clear line.

The model is a tiny random Llama with a byte-level BPE tokenizer trained here on pydoc text, so nothing is
downloaded. The hub-task test runs lm-eval's real loading path with the hub switched to offline mode.
"""

from __future__ import annotations

import json
import math
from pydoc_data.topics import topics

import datasets
import huggingface_hub.constants
import pytest
import torch
from lm_eval.tasks._yaml_loader import load_yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ptq.eval.harness import OFFLINE_TASKS, TASKS_DIR, TaskUnavailableError, evaluate_tasks, load_tasks, task_manager
from ptq.eval.tasks import build

OFFLINE_LIST = "offline tasks: pydoc_choice, pydoc_cloze"


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach the network: the hub is offline (the variables and the flags read at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A 512-token byte-level BPE trained on the first 100k characters of the pydoc corpus (about a second)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([build.corpus()[:100_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def test_offline_tasks_are_listed() -> None:
    assert OFFLINE_TASKS == ("pydoc_choice", "pydoc_cloze")


def test_task_files_rebuild_identically(tmp_path) -> None:
    """The committed YAML and JSONL files are exactly what build.py writes from this interpreter's corpus."""
    recorded = load_yaml(TASKS_DIR / "pydoc_cloze.yaml", resolve_func=False)["metadata"]["corpus_sha256"]
    if recorded != build.corpus_sha256():
        pytest.skip("the task files were built from another Python release's pydoc topics")
    written = build.write_tasks(tmp_path)
    assert len(written) == 4
    for path in written:
        assert path.read_bytes() == (TASKS_DIR / path.name).read_bytes(), path.name


def test_task_items_come_from_the_evaluation_tail() -> None:
    """Every item is text of a topic that starts after the first 70% (the calibration part) of the corpus."""
    text = build.corpus()
    names = build.eval_topics()
    assert names and all(text.index(topics[name]) >= 0.7 * len(text) for name in names)
    tail = " ".join(" ".join(topics[name] for name in names).split())
    cloze = build.load_split("pydoc_cloze.jsonl")["test"]
    choice = build.load_split("pydoc_choice.jsonl")["test"]
    assert len(cloze) >= 200 and len(choice) >= 200
    for item in cloze:
        word = item["target"][1:]
        assert item["target"] == f" {word}" and word.isalpha() and len(word) >= 3
        assert 50 <= len(item["context"].split()) + 1 <= 150
        assert f"{item['context'].split()[-1]} {word}." in tail
    for item in choice:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert f"{item['context']} {item['choices'][item['label']]}" in tail


def test_offline_tasks_run_on_an_in_memory_model(model, tokenizer) -> None:
    results = evaluate_tasks(model, tokenizer, ["pydoc_cloze", "pydoc_choice"], limit=8, batch_size=4)
    assert set(results) == {"pydoc_cloze", "pydoc_choice"}
    assert set(results["pydoc_cloze"]) == {"acc", "acc_stderr", "perplexity", "perplexity_stderr"}
    assert set(results["pydoc_choice"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    for metrics in results.values():
        assert all(isinstance(value, float) and math.isfinite(value) for value in metrics.values())
        assert 0.0 <= metrics["acc"] <= 1.0
    assert 0.0 <= results["pydoc_choice"]["acc_norm"] <= 1.0
    assert results["pydoc_cloze"]["perplexity"] > 1.0


def test_unknown_task_is_one_line_value_error(model, tokenizer) -> None:
    with pytest.raises(ValueError, match=f"unknown task 'no_such_task'; {OFFLINE_LIST}") as err:
        evaluate_tasks(model, tokenizer, ["no_such_task"])
    assert "\n" not in str(err.value)


def test_hub_task_while_offline_is_one_clear_error(model, tokenizer) -> None:
    """Real lm-eval + datasets loading of arc_easy with the hub in offline mode (no mocks of lm-eval)."""
    expected = "task 'arc_easy' needs its dataset from the Hugging Face hub, which is unreachable"
    with pytest.raises(TaskUnavailableError, match=expected) as err:
        evaluate_tasks(model, tokenizer, ["arc_easy"])
    assert "\n" not in str(err.value) and str(err.value).endswith(OFFLINE_LIST)


# Rows in each hub dataset's own columns, two per task: what a user copies from the hub to a machine without it.
HUB_ROWS = {
    "arc_easy": ("test", [
        {"id": "q1", "question": "Which gas do plants take in?", "answerKey": "B",
         "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]}},
        {"id": "q2", "question": "What melts ice?", "answerKey": "A",
         "choices": {"text": ["heat", "cold", "dark", "wind"], "label": ["A", "B", "C", "D"]}},
    ]),
    "hellaswag": ("validation", [
        {"activity_label": "Cooking", "ctx_a": "A man cracks an egg.", "ctx_b": "he", "label": "1",
         "endings": ["sings a song.", "pours it into a pan.", "flies away.", "paints the wall."]},
        {"activity_label": "Running", "ctx_a": "A woman ties her shoes.", "ctx_b": "she", "label": "0",
         "endings": ["starts to run.", "eats the shoe.", "melts.", "turns blue."]},
    ]),
    "piqa": ("validation", [
        {"goal": "Dry wet hands.", "sol1": "Use a towel.", "sol2": "Use a bucket of water.", "label": 0},
        {"goal": "Open a jar.", "sol1": "Freeze the lid.", "sol2": "Twist the lid.", "label": 1},
    ]),
    "winogrande": ("validation", [
        {"sentence": "The cup fell off the table because _ was at the edge.", "option1": "the cup",
         "option2": "the table", "answer": "1"},
        {"sentence": "Anna gave Maria a book because _ had finished it.", "option1": "Anna", "option2": "Maria",
         "answer": "1"},
    ]),
    "lambada_openai": ("test", [
        {"text": "She opened the door and walked into the kitchen"},
        {"text": "The train left the station on time this morning"},
    ]),
}
# The metrics each task's own lm-eval config defines (with their standard errors).
HUB_METRICS = {"arc_easy": {"acc", "acc_norm"}, "hellaswag": {"acc", "acc_norm"}, "piqa": {"acc", "acc_norm"},
               "winogrande": {"acc"}, "lambada_openai": {"acc", "perplexity"}}


def write_hub_copies(folder) -> dict[str, dict[str, str]]:
    files = {}
    for task, (split, rows) in HUB_ROWS.items():
        path = folder / f"{task}-{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        files[task] = {split: str(path)}
    return files


def test_hub_tasks_run_unchanged_on_local_copies_of_their_data(model, tokenizer, tmp_path) -> None:
    """The issue's five hub tasks, with the hub offline: lm-eval's own task configs read the local files."""
    task_data = write_hub_copies(tmp_path)
    results = evaluate_tasks(model, tokenizer, list(HUB_ROWS), batch_size=4, task_data=task_data)
    assert set(results) == set(HUB_ROWS)
    for task, metrics in results.items():
        assert set(metrics) == HUB_METRICS[task] | {f"{m}_stderr" for m in HUB_METRICS[task]}, task
        assert all(math.isfinite(value) for value in metrics.values())
    for task in load_tasks(list(HUB_ROWS), task_data):
        registered = task_manager().task_index[task.config.task].cfg  # functions as "<file>.<name>" strings
        for option in ("process_docs", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list"):
            value = getattr(task.config, option)
            if callable(value):
                assert registered[option].endswith(f".{value.__name__}"), (task.config.task, option)
            else:
                assert value == registered.get(option), (task.config.task, option)
        assert task.config.dataset_path == "json" and len(task.eval_docs) == 2


def test_task_data_without_the_tasks_columns_is_one_line_value_error(tmp_path) -> None:
    path = tmp_path / "arc_easy.jsonl"
    path.write_text('{"text": "no question, no choices"}\n')
    with pytest.raises(ValueError, match="eval.task_data.arc_easy: lm-eval could not read") as err:
        load_tasks(["arc_easy"], {"arc_easy": {"test": str(path)}})
    assert "allowed are files with the hub dataset's columns" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("tasks,task_data,needle", [
    (["arc_easy"], {"arc_easy": {"dev": "x.jsonl"}}, "eval.task_data.arc_easy: splits ['dev']; allowed are"),
    (["arc_easy"], {"arc_easy": {"test": "/no/such.jsonl"}}, "eval.task_data.arc_easy.test='/no/such.jsonl'"),
    ([], {"arc_easy": {"test": "x.jsonl"}}, "eval.task_data: ['arc_easy'] not in eval.tasks=[]"),
    (["pydoc_cloze"], {"pydoc_cloze": {"test": "x.jsonl"}}, "'pydoc_cloze' is not one of lm-eval's hub tasks"),
])
def test_bad_task_data_is_one_line_value_error(tasks, task_data, needle) -> None:
    with pytest.raises(ValueError) as err:
        load_tasks(tasks, task_data)
    assert needle in str(err.value) and "allowed" in str(err.value) and "\n" not in str(err.value)
