"""Task accuracy of an in-memory causal LM with EleutherAI's lm-evaluation-harness.

The model is wrapped in lm-eval's ``HFLM`` as it is (quantized modules included) and evaluated with
``simple_evaluate``. Task names resolve through one ``TaskManager`` that indexes lm-eval's own tasks (their
datasets come from the Hugging Face hub) plus the offline tasks in ``ptq/eval/tasks/`` (``pydoc_cloze``,
``pydoc_choice``; their data ship with ptq, see ``ptq/eval/tasks/build.py``). A hub task can read local copies
of its splits instead (``task_data``, e.g. on a cluster without internet): the task's own prompts, answer
choices, preprocessing and metrics are kept, only the dataset is loaded from the files.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub.errors import LocalEntryNotFoundError

TASKS_DIR = Path(__file__).resolve().with_name("tasks")
OFFLINE_TASKS = tuple(sorted(path.stem for path in TASKS_DIR.glob("*.yaml")))
# What datasets/huggingface_hub raise when the hub cannot be reached (offline mode included: OfflineModeIsEnabled
# subclasses ConnectionError) and the dataset is not in the local cache.
HUB_UNREACHABLE = (ConnectionError, LocalEntryNotFoundError)


# task_data split names → the lm-eval task config keys that name a split.
SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}
# Local file suffix → the ``datasets`` builder that reads it (the formats the hub serves datasets in).
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class TaskUnavailableError(RuntimeError):
    """A known task whose dataset cannot be loaded because the Hugging Face hub is unreachable."""


@functools.cache
def task_manager() -> Any:
    """lm-eval's task index with ptq's offline tasks added (built once per process: it parses ~15k YAMLs)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR))


def local_task_config(name: str, files: Mapping[str, str]) -> dict[str, Any]:
    """lm-eval's own config of task ``name`` with its splits read from local ``files`` ({split: path}).

    ``dataset_path`` becomes the ``datasets`` builder of the files' format and ``dataset_kwargs.data_files`` the
    files (lm-eval passes both to ``datasets.load_dataset``); splits not given are switched off, so an evaluation
    split alone is enough for zero-shot runs. The files must hold the hub dataset's columns.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    key = f"eval.task_data.{name}"
    manager = task_manager()
    entry = manager.task_index.get(name)
    if entry is None or entry.yaml_path is None or name in OFFLINE_TASKS or name in manager.all_groups:
        raise ValueError(f"{key}: {name!r} is not one of lm-eval's hub tasks; allowed is a single lm-eval task "
                         "whose dataset comes from the Hugging Face hub")
    unknown = sorted(set(files) - set(SPLIT_KEYS))
    if unknown or not files:
        raise ValueError(f"{key}: splits {unknown or '{}'}; allowed are {', '.join(SPLIT_KEYS)} (at least one)")
    paths = {split: Path(path).expanduser() for split, path in files.items()}
    for split, path in paths.items():
        if not path.is_file() or path.suffix not in FILE_BUILDERS:
            raise ValueError(f"{key}.{split}={str(files[split])!r}: allowed is an existing "
                             f"{'/'.join(FILE_BUILDERS)} file")
    builders = {FILE_BUILDERS[path.suffix] for path in paths.values()}
    if len(builders) > 1:
        raise ValueError(f"{key}: files of formats {sorted(builders)}; allowed is one format per task")
    config = load_yaml(entry.yaml_path, resolve_func=True)
    config.update({"dataset_path": builders.pop(), "dataset_name": None,
                   "dataset_kwargs": {"data_files": {split: str(path) for split, path in paths.items()}}})
    config.update({option: split if split in paths else None for split, option in SPLIT_KEYS.items()})
    return config


def load_local_task(name: str, files: Mapping[str, str]) -> dict[str, Any]:
    """lm-eval's ``TaskManager.load`` of ``local_task_config``; files it cannot read as the task's dataset (other
    columns, a broken file) fail in one line naming the key."""
    config = local_task_config(name, files)
    try:
        return task_manager().load([config])
    except Exception as err:  # whatever the user's files make datasets or the task's templates raise
        cause = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        raise ValueError(f"eval.task_data.{name}: lm-eval could not read {sorted(files.values())} as {name!r} "
                         f"({cause}); allowed are files with the hub dataset's columns") from err


def load_tasks(names: list[str], task_data: Mapping[str, Mapping[str, str]] | None = None) -> list[Any]:
    """lm-eval Task/Group objects for ``names``, failing with one line for an unknown or unreachable task.

    ``task_data`` maps a hub task of ``names`` to local files of its splits (``local_task_config``).
    """
    manager = task_manager()
    offline = ", ".join(OFFLINE_TASKS)
    task_data = task_data or {}
    stray = sorted(set(task_data) - set(names))
    if stray:
        raise ValueError(f"eval.task_data: {stray} not in eval.tasks={names}; allowed are tasks that are evaluated")
    loaded: list[Any] = []
    for name in names:
        if name not in manager.all_tasks:
            raise ValueError(
                f"eval.tasks: unknown task {name!r}; offline tasks: {offline} (or any lm-eval task name, "
                "which needs the Hugging Face hub)"
            )
        if name in task_data:
            result = load_local_task(name, task_data[name])
        else:
            try:
                result = manager.load([name])
            except HUB_UNREACHABLE as err:
                raise TaskUnavailableError(
                    f"eval.tasks: task {name!r} needs its dataset from the Hugging Face hub, which is unreachable; "
                    f"offline tasks: {offline}"
                ) from err
        groups = result.get("groups", {})
        loaded += [groups[name]] if name in groups else list(result["tasks"].values())
    return loaded


def collect_metrics(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's ``results["results"]`` as plain floats: ``{"task": {"acc": .., "acc_stderr": .., ...}}``.

    lm-eval keys metrics ``"<metric>,<filter>"``; the default filter ``none`` is dropped from the name, other
    filters stay (``"exact_match,strict-match"``). Non-numeric entries (the alias, an ``"N/A"`` stderr) are left out.
    """
    metrics: dict[str, dict[str, float]] = {}
    for task, entry in results.items():
        values = {}
        for key, value in entry.items():
            metric, comma, filter_name = key.partition(",")
            if comma and isinstance(value, (int, float)) and not isinstance(value, bool):
                values[metric if filter_name == "none" else key] = float(value)
        metrics[task] = values
    return metrics


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    bootstrap_iters: int = 1000,
    task_data: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate ``model`` on lm-eval ``tasks`` and return each task's metrics as plain floats.

    Args:
        model: a transformers causal LM (moved to ``device`` in place; lm-eval evaluates it where it is).
        tokenizer: its tokenizer.
        tasks: task, group or tag names: ptq's offline tasks or lm-eval's own (which download from the hub).
        limit: first N items per task, or a fraction of each task if below 1; None for all.
        batch_size: sequences per forward pass.
        num_fewshot: in-context examples; None keeps each task's default (0 here); pydoc_cloze stays zero-shot.
        device: torch device for the model.
        seed: seeds Python, NumPy and torch, and lm-eval's few-shot sampler.
        bootstrap_iters: resamples for bootstrapped standard errors (perplexity's); lm-eval's default is 100000.
        task_data: {hub task: {split: local file}}: that task reads these files instead of the hub.

    Returns:
        ``{task: {metric: value}}`` for every task and group evaluated: ``acc``, ``acc_norm`` and ``perplexity``
        where the task defines them, each with its ``<metric>_stderr``.

    Raises:
        ValueError: a task name that neither ptq nor lm-eval knows, or a bad ``task_data`` entry.
        TaskUnavailableError: a hub task whose dataset cannot be downloaded (no network, or HF_DATASETS_OFFLINE=1).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    task_objects = load_tasks(tasks, task_data)
    lm = HFLM(pretrained=model.to(device), tokenizer=tokenizer, batch_size=batch_size)
    output = simple_evaluate(
        model=lm,
        tasks=task_objects,
        num_fewshot=num_fewshot,
        limit=limit,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
        task_manager=task_manager(),
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return collect_metrics(output["results"])
