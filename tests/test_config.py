"""Bad input fails fast, in one line that names the key, the value and what is allowed — before any model loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ptq.config import ConfigError, validate
from ptq.transforms import build_steps

ROOT = Path(__file__).resolve().parent.parent

BAD_OVERRIDES = [
    (["bits=0"], "bits=0"),
    (["bits=9"], "bits=9"),
    (["group_size=0"], "group_size=0"),
    (["method=nonsense"], "method='nonsense'"),
    (["observer=nonsense"], "observer='nonsense'"),
    (["model=nonsense"], "model='nonsense'"),
    (["data=nonsense"], "data='nonsense'"),
    (["observer=percentile", "observer.percentile=150"], "observer.percentile=150"),
    (["model=hf", "model.source=/no/such/model/dir"], "model.source='/no/such/model/dir'"),
    (["data=text", "data.path=/no/such/file.txt"], "data.path='/no/such/file.txt'"),
    (["model=hf", "model.source=nobody-xyz/not-a-cached-model"], "model.source='nobody-xyz/not-a-cached-model'"),
    (["device=tpu"], "device='tpu'"),
    (["bitz=4"], "bitz: Key 'bitz' not in 'Config'"),
    (["eval.task_data.arc_easy.test=a.jsonl"], "eval.task_data.arc_easy: Key 'arc_easy' is not in struct"),
    (["eval.tasks=[arc_easy]", "+eval.task_data.arc_easy.test=/no/such.jsonl"],
     "eval.task_data.arc_easy.test='/no/such.jsonl'"),
]


@pytest.mark.parametrize("overrides,needle", BAD_OVERRIDES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_input_exits_with_one_line(overrides, needle, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "logger=none", *overrides,
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=180,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0] and "allowed" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "Loading weights" not in proc.stderr + proc.stdout  # stopped before any model was read
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("override,needle", [
    ("method.steps.0.weight.granularity=row", "granularity='row'"),
    ("method.steps.0.name=unknown", "name='unknown'"),
    ("data.n_samples=0", "data.n_samples=0"),
    ("method.propagate=sideways", "method.propagate='sideways'"),
])
def test_validate_names_the_key(tiny_config, override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace(".", r"\.")):
        validate(tiny_config(override))


def test_activation_clip_ratio_reaches_every_input_quantizer_and_changes_the_output():
    from test_export_ptq import calibrated_llama

    steps = [{"name": "rtn", "weight": {"bits": 8, "granularity": "channel"},
              "activations": {"bits": 4, "granularity": "token", "clip_ratio": clip}} for clip in (1.0, 0.7)]
    models = [calibrated_llama([step]) for step in steps]
    quantizers = [[m.input_quantizer for m in model.modules() if hasattr(m, "input_quantizer")] for model in models]
    assert len(quantizers[1]) == 14 and {q.clip_ratio for q in quantizers[1]} == {0.7}
    tokens = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert not torch.allclose(models[0](tokens).logits, models[1](tokens).logits)


@pytest.mark.parametrize("activations", [{"bits": 4, "granularity": "token", "clip_ratio": 1.5},
                                         {"bits": 8, "granularity": "tensor", "clip_ratio": 0.9,
                                          "observer": {"name": "minmax"}}])
def test_a_clip_ratio_outside_0_1_or_on_static_ranges_is_refused(activations):
    step = {"name": "rtn", "weight": {"bits": 8, "granularity": "channel"}, "activations": activations}
    with pytest.raises(ValueError, match=r"activations\.clip_ratio=.*allowed"):
        build_steps([step], {"name": "minmax"})


def test_group_size_null_means_per_channel(tiny_config):
    (step,) = validate(tiny_config("group_size=null", "bits=8"))
    assert step.weight.granularity == "channel" and step.weight.bits == 8


def test_a_rescaler_after_a_quantizer_is_rejected(tiny_config):
    cfg = tiny_config("method=awq")
    steps = list(cfg.method.steps)
    cfg.method.steps = [steps[1], steps[0]]
    with pytest.raises(ConfigError, match="rescalers"):
        validate(cfg)


@pytest.mark.parametrize("method", sorted(p.stem for p in (ROOT / "configs" / "method").glob("*.yaml")))
def test_every_method_config_builds_its_steps(tiny_config, method):
    cfg = tiny_config(f"method={method}")
    assert [step.name for step in validate(cfg)] == [step.name for step in cfg.method.steps]
