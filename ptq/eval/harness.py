"""Task accuracy of an in-memory causal LM with EleutherAI's lm-evaluation-harness.

The model is wrapped in lm-eval's ``HFLM`` as it is (quantized modules included) and evaluated with
``simple_evaluate``. Task names resolve through one ``TaskManager`` that indexes lm-eval's own tasks (their
datasets come from the Hugging Face hub) plus the offline tasks in ``ptq/eval/tasks/`` (``pydoc_cloze``,
``pydoc_choice``; their data ship with ptq, see ``ptq/eval/tasks/build.py``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from huggingface_hub.errors import LocalEntryNotFoundError

TASKS_DIR = Path(__file__).resolve().with_name("tasks")
OFFLINE_TASKS = tuple(sorted(path.stem for path in TASKS_DIR.glob("*.yaml")))
# What datasets/huggingface_hub raise when the hub cannot be reached (offline mode included: OfflineModeIsEnabled
# subclasses ConnectionError) and the dataset is not in the local cache.
HUB_UNREACHABLE = (ConnectionError, LocalEntryNotFoundError)


class TaskUnavailableError(RuntimeError):
    """A known task whose dataset cannot be loaded because the Hugging Face hub is unreachable."""


@functools.cache
def task_manager() -> Any:
    """lm-eval's task index with ptq's offline tasks added (built once per process: it parses ~15k YAMLs)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR))


def load_tasks(names: list[str]) -> list[Any]:
    """lm-eval Task/Group objects for ``names``, failing with one line for an unknown or unreachable task."""
    manager = task_manager()
    offline = ", ".join(OFFLINE_TASKS)
    loaded: list[Any] = []
    for name in names:
        if name not in manager.all_tasks:
            raise ValueError(
                f"eval.tasks: unknown task {name!r}; offline tasks: {offline} (or any lm-eval task name, "
                "which needs the Hugging Face hub)"
            )
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

    Returns:
        ``{task: {metric: value}}`` for every task and group evaluated: ``acc``, ``acc_norm`` and ``perplexity``
        where the task defines them, each with its ``<metric>_stderr``.

    Raises:
        ValueError: a task name that neither ptq nor lm-eval knows.
        TaskUnavailableError: a hub task whose dataset cannot be downloaded (no network, or HF_DATASETS_OFFLINE=1).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    task_objects = load_tasks(tasks)
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
