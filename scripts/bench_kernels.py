"""Benchmark the packed kernels against cuBLAS and torch's built-in int kernels (GPU only).

Per Llama-3-8B linear shape (N × K) and token count M, median µs from ``triton.testing.do_bench`` of:

- ``bf16``:       cuBLAS, x · Wᵀ with W bf16 (the baseline);
- ``w4a16``:      ours, the path ``w4a16_linear`` picks for M; ``fused`` / ``deq+mm`` force one path (for tuning
                  ``LARGE_M``);
- ``tinygemm``:   ``torch.ops.aten._weight_int4pack_mm`` on ``_convert_weight_to_int4pack`` weights (same group);
- ``w8a8``:       ours, per-token activation quantization included;
- ``_int_mm``:    ``torch._int_mm`` int8 × int8 → int32 with a column-major RHS, quantization and rescale excluded.

Achieved bandwidth of bf16 and w4a16 (bytes of weights + scales + x + y over time) is shown as a fraction of a
device-to-device copy bandwidth measured in the same run. Then end-to-end greedy decode tokens/s of a random-
weight Llama (Llama-3.2-1B shape, from ``transformers.LlamaConfig``): bf16 vs packed W4A16 (RTN, asymmetric,
group 128) vs packed W8A8, with every decoder Linear converted by ``ptq.packed.convert``.

Usage: python scripts/bench_kernels.py [--m 1,16,64,512,4096] [--group 128] [--tokens 128] [--no-e2e]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (6144, 4096)]  # (N, K): o_proj, gate/up, down, qkv
COLUMNS = ["bf16", "w4a16", "fused", "deq+mm", "tinygemm", "w8a8", "_int_mm"]


def bench(fn: Callable[[], object]) -> float | None:
    """Median µs of ``fn`` (its first call, which may autotune, is excluded); None if it raises."""
    import triton.testing

    try:
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    except Exception as err:  # a missing op or an unsupported shape must not end the sweep
        print(f"  ({getattr(fn, 'label', 'op')} unavailable: {str(err).splitlines()[0][:100]})", file=sys.stderr)
        return None


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s (read + write) of a 1 GiB buffer."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench(lambda: dst.copy_(src)) * 1e-6) / 1e9


def int4_operands(w: torch.Tensor, group: int) -> dict:
    """RTN (asymmetric min/max) of ``w`` into our layout and tinygemm's."""
    from ptq.affine import minmax_qparams, quantize
    from ptq.kernels import reference
    from ptq.spec import QuantSpec

    spec = QuantSpec(4, False, "group", group)
    scale, zero = minmax_qparams(w.float(), spec)
    q = quantize(w, scale, zero, spec).to(torch.int32)  # [N, K] in 0..15
    ours = (reference.pack_int4_weight(q, False), scale.t().contiguous().to(w.dtype), reference.pack_zeros(zero, 4))
    # tinygemm dequantizes (q − 8) · s + m, so m = s · (8 − z); uint8 input holds two nibbles, high one first.
    tiny = None
    try:
        packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        weight = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
        s_and_z = torch.stack([scale, scale * (8 - zero)], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        tiny = (weight, s_and_z)
    except (RuntimeError, NotImplementedError) as err:
        print(f"  (tinygemm packing unavailable: {str(err).splitlines()[0][:100]})", file=sys.stderr)
    return {"ours": ours, "tiny": tiny, "bytes": ours[0].nbytes + ours[1].nbytes + ours[2].nbytes}


def int8_operands(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel int8 weight [N, K] and fp32 scales [N]."""
    from ptq.affine import minmax_qparams, quantize
    from ptq.spec import QuantSpec

    spec = QuantSpec(8, True, "channel")
    scale, zero = minmax_qparams(w.float(), spec)
    return quantize(w, scale, zero, spec).to(torch.int8), scale.reshape(-1).contiguous()


def labelled(label: str, fn: Callable[[], object]) -> Callable[[], object]:
    fn.label = label
    return fn


def bench_shape(n: int, k: int, ms: list[int], group: int, copy_bw: float) -> list[dict]:
    from ptq.kernels import triton_w4a16, triton_w8a8

    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    i4 = int4_operands(w, group)
    qweight, scales, zeros = i4["ours"]
    w8, w8_scale = int8_operands(w)
    w8_t = w8.t()  # column-major [K, N]: the RHS layout torch._int_mm wants
    tiny = i4["tiny"]
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        xq, _ = triton_w8a8.quantize_per_token(x)
        fns = {
            "bf16": lambda x=x: torch.matmul(x, w.t()),
            "w4a16": lambda x=x: triton_w4a16.w4a16_linear(x, qweight, scales, zeros, group),
            "fused": lambda x=x: triton_w4a16.w4a16_linear(x, qweight, scales, zeros, group, path="fused"),
            "deq+mm": lambda x=x: triton_w4a16.w4a16_linear(x, qweight, scales, zeros, group, path="dequant"),
            "w8a8": lambda x=x: triton_w8a8.w8a8_linear(x, w8, w8_scale),
            "_int_mm": lambda xq=xq: torch._int_mm(xq, w8_t),
        }
        if tiny is not None:
            fns["tinygemm"] = lambda x=x: torch.ops.aten._weight_int4pack_mm(x, tiny[0], group, tiny[1])
        times = {name: bench(labelled(f"{name} M={m} {n}x{k}", fn)) for name, fn in fns.items()}
        io = 2 * m * (k + n)  # bf16 activations in, outputs out
        bw = {"bf16": (2 * n * k + io), "w4a16": (i4["bytes"] + io)}
        row = {"N": n, "K": k, "M": m, "us": times}
        row["bw"] = {c: b / (times[c] * 1e-6) / 1e9 / copy_bw for c, b in bw.items() if times[c]}
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    base = row["us"]["bf16"]
    cells = []
    for c in COLUMNS:
        t = row["us"].get(c)
        cells.append(f"{'n/a':>17}" if t is None else f"{t:9.1f} ({base / t:4.2f}x)")
    bw = " ".join(f"{row['bw'].get(c, float('nan')):5.0%}" for c in ("bf16", "w4a16"))
    return f"{row['N']:>6}x{row['K']:<6}{row['M']:>6}  " + "  ".join(cells) + f"  {bw}"


def header(copy_bw: float) -> str:
    cols = "  ".join(f"{c:>17}" for c in COLUMNS)
    return (f"µs (speedup vs bf16); bandwidth as a fraction of copy = {copy_bw:.0f} GB/s\n"
            f"{'N x K':<13}{'M':>6}  {cols}  bw:bf16 w4a16")


# ---- end to end ------------------------------------------------------------------------------------------------


def llama_1b() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096,
                         tie_word_embeddings=True, rope_theta=500000.0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()


def attach_rtn(model: torch.nn.Module, weight_spec, input_spec) -> None:
    """Round-to-nearest every decoder Linear and attach the calibration contract that ``convert`` reads."""
    from ptq.affine import fake_quantize, minmax_qparams

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            scale, zero = minmax_qparams(module.weight.detach().float(), weight_spec)
            module.weight.data = fake_quantize(module.weight.detach(), scale, zero, weight_spec)
            module.weight_scale, module.weight_zero = scale, zero
            module.weight_spec, module.input_spec = weight_spec, input_spec


def tokens_per_second(model: torch.nn.Module, tokens: int, repeats: int = 3) -> float:
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), device="cuda")
    kwargs = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}
    with torch.no_grad():
        model.generate(prompt, **kwargs)  # warm-up (autotuning, caches)
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(prompt, **kwargs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return tokens / statistics.median(times)


def bench_e2e(tokens: int, group: int) -> None:
    from ptq.packed import QuantLinear, convert
    from ptq.spec import QuantSpec

    variants = {
        "bf16": None,
        f"w4a16 g{group}": (QuantSpec(4, False, "group", group), None),
        "w8a8": (QuantSpec(8, True, "channel"), QuantSpec(8, True, "token")),
    }
    print(f"\nend to end: random-weight Llama (1B shape), greedy decode of {tokens} tokens after a 32-token prompt")
    print(f"{'model':<14}{'tokens/s':>10}{'speedup':>9}{'linear MiB':>12}")
    base = None
    for name, specs in variants.items():
        model = llama_1b()
        if specs is not None:
            attach_rtn(model, *specs)
            model = convert(model, "triton")
        linears = [m for m in model.model.layers.modules() if isinstance(m, (torch.nn.Linear, QuantLinear))]
        mib = sum(m.parameter_bytes() if isinstance(m, QuantLinear) else m.weight.nbytes for m in linears) / 2**20
        tps = tokens_per_second(model, tokens)
        base = base or tps
        print(f"{name:<14}{tps:>10.1f}{tps / base:>8.2f}x{mib:>12.0f}", flush=True)
        del model
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="1,16,64,512,4096", help="token counts M, comma separated")
    parser.add_argument("--group", type=int, default=128, help="W4A16 group size")
    parser.add_argument("--tokens", type=int, default=128, help="decode length of the end-to-end run")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end decode benchmark")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU and none is visible: nothing was measured.")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    copy_bw = copy_bandwidth()
    print(header(copy_bw))
    ms = [int(m) for m in args.m.split(",")]
    for n, k in SHAPES:
        bench_shape(n, k, ms, args.group, copy_bw)
    if not args.no_e2e:
        bench_e2e(args.tokens, args.group)


if __name__ == "__main__":
    main()
