"""The GGUF model cache: a second load reads the cached entry and gives the very same model; an interrupted save
leaves nothing readable; ``PTQ_CACHE_DIR`` and the dtype pick the entry.

A tiny Llama GGUF file (two blocks 32 wide, some tensors Q8_0 so that loading dequantizes) is written with gguf-py,
so these tests take seconds; the embedded 98 MB model is tested once, marked slow.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ptq.models import cache
from ptq.models.loading import ResolvedSource, load_pretrained

TOKENS = torch.tensor([[1, 5, 9, 17, 33, 65, 2, 7]])


def write_tiny_llama_gguf(path: Path, seed: int = 0, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                          intermediate: int = 64, blocks: int = 2, vocab: int = 96) -> Path:
    """A random Llama as a GGUF file that transformers loads: F32 tensors, token embedding and gate Q8_0."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(blocks)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)

    def add(name: str, rows: int, cols: int, q8: bool = False) -> None:
        values = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
        if q8:
            writer.add_tensor(name, quantize(values, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, values)

    kv_width = kv_heads * hidden // heads
    add("token_embd.weight", vocab, hidden, q8=True)
    for i in range(blocks):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", 1 + rng.random(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + rng.random(hidden, dtype=np.float32))
        for name, rows, cols in [("attn_q", hidden, hidden), ("attn_k", kv_width, hidden),
                                 ("attn_v", kv_width, hidden), ("attn_output", hidden, hidden),
                                 ("ffn_up", intermediate, hidden), ("ffn_down", hidden, intermediate)]:
            add(f"blk.{i}.{name}.weight", rows, cols)
        add(f"blk.{i}.ffn_gate.weight", intermediate, hidden, q8=True)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> ResolvedSource:
    path = write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return ResolvedSource(str(path.parent), path.name)


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def gguf_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records, per ``from_pretrained`` call, whether it read the GGUF file or a saved directory."""
    from transformers import AutoModelForCausalLM

    calls: list[str] = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, location, *args, **kwargs):
        calls.append("gguf" if kwargs.get("gguf_file") else "saved")
        return original(cls, location, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    return calls


def entries(cache_dir: Path) -> list[Path]:
    models = cache_dir / "models"
    return sorted(p for p in models.iterdir() if not p.name.startswith(".")) if models.is_dir() else []


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Same class, same parameters bit for bit, same logits."""
    assert type(a) is type(b)
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name, tensor in state_a.items():
        assert tensor.dtype == state_b[name].dtype and torch.equal(tensor, state_b[name]), name
    with torch.no_grad():
        assert torch.equal(a(TOKENS).logits, b(TOKENS).logits)


def test_second_load_reads_the_cache_and_gives_the_same_model(tiny_gguf, cache_dir, gguf_loads):
    fresh = load_pretrained(tiny_gguf, "float32")
    assert gguf_loads == ["gguf"] and len(entries(cache_dir)) == 1
    cached = load_pretrained(tiny_gguf, "float32")
    assert gguf_loads == ["gguf", "saved"]
    assert_same_model(fresh, cached)
    assert not fresh.training and not cached.training
    assert getattr(fresh, "hf_quantizer", None) is None, "the fresh model keeps no GGUF quantizer mark"


def test_two_dtypes_are_two_entries(tiny_gguf, cache_dir, gguf_loads):
    load_pretrained(tiny_gguf, "float32")
    half = load_pretrained(tiny_gguf, "bfloat16")
    assert gguf_loads == ["gguf", "gguf"]
    names = [p.name for p in entries(cache_dir)]
    assert len(names) == 2 and any("-float32-" in n for n in names) and any("-bfloat16-" in n for n in names)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert_same_model(half, load_pretrained(tiny_gguf, "bfloat16"))
    assert gguf_loads[-1] == "saved"


def test_a_different_file_is_a_different_entry(tiny_gguf, cache_dir, tmp_path):
    other = write_tiny_llama_gguf(tmp_path / "other.gguf", seed=1)
    a = load_pretrained(tiny_gguf, "float32")
    b = load_pretrained(ResolvedSource(str(other.parent), other.name), "float32")
    assert len(entries(cache_dir)) == 2
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_cache_dir_is_ptq_cache_dir_or_home_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert cache.cache_root() == tmp_path / "elsewhere"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for unset in (lambda: monkeypatch.delenv("PTQ_CACHE_DIR"), lambda: monkeypatch.setenv("PTQ_CACHE_DIR", "")):
        unset()
        assert cache.cache_root() == tmp_path / "home" / ".cache" / "ptq"


def test_entry_key_is_file_hash_dtype_and_transformers_version(tmp_path, cache_dir):
    gguf = tmp_path / "a.gguf"
    gguf.write_bytes(b"one")
    first = cache.entry_dir(gguf, "float16")
    assert first.parent == cache_dir / "models"
    assert first.name.endswith(f"-float16-transformers{cache.converter_version()}")
    gguf.write_bytes(b"two")
    assert cache.entry_dir(gguf, "float16") != first


def test_a_save_that_fails_leaves_no_entry_and_no_partial_directory(tmp_path):
    target = tmp_path / "models" / "entry"

    def half_then_fail(directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.save_atomically(half_then_fail, target)
    assert list((tmp_path / "models").iterdir()) == []


def test_a_failed_save_is_reported_and_the_fresh_model_still_returned(tmp_path, cache_dir, capsys):
    gguf = tmp_path / "a.gguf"
    gguf.write_bytes(b"weights")

    def refuse(model: object, directory: Path) -> None:
        raise ValueError("not serializable\nmore detail")

    model = cache.cached_load(gguf, "float32", lambda: "fresh", lambda directory: "saved", refuse)
    assert model == "fresh" and entries(cache_dir) == []
    assert "model cache: not saved" in capsys.readouterr().err


def test_an_unreadable_entry_is_loaded_afresh_and_replaced(tmp_path, cache_dir, capsys):
    gguf = tmp_path / "a.gguf"
    gguf.write_bytes(b"weights")
    broken = cache.entry_dir(gguf, "float32")
    broken.mkdir(parents=True)
    (broken / "model.safetensors").write_bytes(b"truncated")

    def load_saved(directory: Path) -> str:
        if (directory / "model.safetensors").read_bytes() == b"truncated":
            raise OSError("incomplete metadata, file not fully covered")
        return "saved"

    def save(model: str, directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"whole")

    assert cache.cached_load(gguf, "float32", lambda: "fresh", load_saved, save) == "fresh"
    assert "unreadable, loading afresh" in capsys.readouterr().err
    assert cache.cached_load(gguf, "float32", lambda: "fresh", load_saved, save) == "saved"


KILLED_SAVER = """
import sys, time
from pathlib import Path
from ptq.models.cache import save_atomically

def slow(directory):
    (directory / "model.safetensors").write_bytes(b"half")
    Path(sys.argv[2]).touch()
    time.sleep(60)

save_atomically(slow, Path(sys.argv[1]))
"""


def test_a_killed_save_leaves_no_readable_entry_and_the_next_save_cleans_up(tmp_path):
    target, started = tmp_path / "models" / "entry", tmp_path / "started"
    saver = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_SAVER), str(target), str(started)])
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and saver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the saving process never started writing"
    finally:
        os.kill(saver.pid, signal.SIGKILL)
        saver.wait()
    assert not target.exists()
    assert len(list(target.parent.glob(f".{target.name}.*"))) == 1, "the killed save's temporary directory"
    cache.save_atomically(lambda directory: (directory / "config.json").write_text("{}"), target)
    assert (target / "config.json").is_file()
    assert list(target.parent.glob(f".{target.name}.*")) == [], "the stale temporary directory was removed"


@pytest.mark.slow
def test_embedded_model_second_load_reads_the_cache_and_is_identical(cache_dir, gguf_loads):
    from ptq.models.loading import embedded_smollm2

    source = embedded_smollm2()
    fresh = load_pretrained(source, "float32")
    cached = load_pretrained(source, "float32")
    assert gguf_loads == ["gguf", "saved"]
    assert_same_model(fresh, cached)


@pytest.mark.slow
def test_embedded_tokenizer_cached_encodes_the_corpus_identically(cache_dir):
    """The tokenizer entry (``TOKENIZER_ENTRY``) reloads to the same encoding of the whole pydoc corpus."""
    from transformers import AutoTokenizer

    from ptq.data import load_tokens
    from ptq.models.loading import embedded_smollm2

    source = embedded_smollm2()
    gguf = Path(source.location) / source.gguf_file

    def load() -> object:
        return cache.cached_load(gguf, cache.TOKENIZER_ENTRY,
                                 lambda: AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file),
                                 AutoTokenizer.from_pretrained, lambda tok, directory: tok.save_pretrained(directory))

    fresh, cached = load(), load()
    assert (cache.entry_dir(gguf, cache.TOKENIZER_ENTRY) / "tokenizer.json").is_file()
    a, b = load_tokens("pydoc", fresh, None), load_tokens("pydoc", cached, None)
    assert torch.equal(a.calibration, b.calibration) and torch.equal(a.evaluation, b.evaluation)
    assert fresh.special_tokens_map == cached.special_tokens_map and fresh.chat_template == cached.chat_template
