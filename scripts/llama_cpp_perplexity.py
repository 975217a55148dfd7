"""Perplexity of a GGUF file as llama.cpp computes it, on ptq's evaluation windows, beside transformers' reading.

llama.cpp (through the ``llama-cpp-python`` package, optional: it builds from source, about 45 minutes on a busy
2-core machine) runs each non-overlapping window of the run's evaluation split; the same windows go through
transformers' GGUF loader. Both perplexities and their relative difference are printed as a table.

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF" \\
        .venv/bin/pip install llama-cpp-python
    .venv/bin/python scripts/llama_cpp_perplexity.py outputs/<day>/<run>/export/model.gguf --max-windows 16
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from ptq.data import evaluation_windows, load_tokens
from ptq.eval.perplexity import perplexity, window_nll
from ptq.models import load_pretrained, load_tokenizer, resolve_source


def llama_cpp_perplexity(path: Path, windows: torch.Tensor, threads: int) -> float:
    """exp of the mean next-token NLL of ``windows`` [n, seq_len] under llama.cpp's logits."""
    from llama_cpp import Llama

    seq_len = windows.shape[1]
    llm = Llama(model_path=str(path), n_ctx=seq_len, n_batch=seq_len, logits_all=True, n_threads=threads,
                verbose=False)
    total = 0.0
    for window in windows:
        llm.reset()
        llm.eval(window.tolist())
        total += float(window_nll(torch.tensor(llm.scores[:seq_len], dtype=torch.float32), window))
    return math.exp(total / (windows.shape[0] * (seq_len - 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--data", default="pydoc")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    source = resolve_source(str(args.gguf))
    tokenizer = load_tokenizer(source)
    windows = evaluation_windows(load_tokens(args.data, tokenizer).evaluation, args.seq_len, args.max_windows)
    torch.set_num_threads(args.threads)
    reference = perplexity(load_pretrained(source, "float32"), windows, batch_size=4, progress=False)
    measured = llama_cpp_perplexity(args.gguf, windows, args.threads)
    print(f"{'reader':<28}{'perplexity':>12}   ({windows.shape[0]} windows of {args.seq_len} tokens)")
    print(f"{'transformers (dequantized)':<28}{reference:>12.4f}")
    print(f"{'llama.cpp':<28}{measured:>12.4f}   {100 * (measured / reference - 1):+.3f}%")


if __name__ == "__main__":
    main()
