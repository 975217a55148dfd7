"""The block-wise engine: an identity step leaves the model unchanged; quantizers beat each other where theory says."""

from __future__ import annotations

import copy

import pytest
import torch

from ptq.calibrate import BlockContext, calibrate
from ptq.models.mappings import LLAMA
from ptq.nn import FakeQuantLinear
from ptq.spec import QuantSpec
from ptq.transforms.gptq import GPTQ
from ptq.transforms.rtn import RTN


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def samples(n: int = 6, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (n, length), generator=torch.Generator().manual_seed(seed))


class Recorder:
    """An identity step that only looks: counts the blocks and the inputs it is given."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def apply(self, ctx: BlockContext) -> None:
        self.seen.append((ctx.index, sum(x.shape[0] for x in ctx.inputs)))
        ctx.stream({"mlp.down_proj": lambda x: None})


def test_identity_step_leaves_full_precision_output_unchanged():
    model, x = tiny_llama(), samples()
    with torch.no_grad():
        before = model(x).logits
    recorder = Recorder()
    calibrate(model, LLAMA, x, [recorder], batch_size=4, progress=False)
    with torch.no_grad():
        after = model(x).logits
    assert recorder.seen == [(0, 6), (1, 6)]
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_every_linear_of_every_block_is_quantized_and_head_is_not():
    model = tiny_llama()
    spec = QuantSpec(bits=4, granularity="group", group_size=32)
    logs = calibrate(model, LLAMA, samples(), [RTN(weight=spec)], batch_size=4, progress=False)
    quantized = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    assert len(quantized) == 2 * 7 and sorted(quantized) == sorted(logs)
    assert not isinstance(model.lm_head, FakeQuantLinear)


def output_error(reference, model, x) -> float:
    with torch.no_grad():
        return (reference(x).logits - model(x).logits).pow(2).mean().item()


@pytest.mark.parametrize("true_sequential", [False, True])
def test_gptq_model_error_below_rtn(true_sequential):
    reference, x = tiny_llama(), samples(n=16, length=32)
    spec = QuantSpec(bits=3, granularity="group", group_size=32)
    errors = {}
    for name, step in {"rtn": RTN(weight=spec), "gptq": GPTQ(weight=spec, true_sequential=true_sequential)}.items():
        model = copy.deepcopy(reference)
        calibrate(model, LLAMA, x, [step], batch_size=8, progress=False)
        errors[name] = output_error(reference, model, x)
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


class BlockInputSpy:
    """A step that keeps the calibration inputs handed to block ``index``."""

    name = "spy"

    def __init__(self, index: int) -> None:
        self.index, self.inputs = index, None

    def apply(self, ctx: BlockContext) -> None:
        if ctx.index == self.index:
            self.inputs = torch.cat(ctx.inputs)


def test_propagate_fp_feeds_full_precision_outputs_onward():
    reference, x = tiny_llama(), samples()
    captured: list[torch.Tensor] = []
    handle = reference.model.layers[1].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    with torch.no_grad():
        reference(x)
    handle.remove()
    spies = {}
    for propagate in ("quantized", "fp"):
        spies[propagate] = BlockInputSpy(1)
        steps = [spies[propagate], RTN(weight=QuantSpec(bits=2, granularity="channel"))]
        calibrate(copy.deepcopy(reference), LLAMA, x, steps, propagate=propagate, progress=False)
    torch.testing.assert_close(spies["fp"].inputs, captured[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(spies["quantized"].inputs, captured[0], atol=1e-3)


def test_static_activation_quantization_is_calibrated():
    model = tiny_llama()
    step = RTN(weight=QuantSpec(bits=8, granularity="channel"),
               activations=QuantSpec(bits=8, granularity="tensor"), act_observer="minmax")
    calibrate(model, LLAMA, samples(), [step], progress=False)
    quantizer = model.model.layers[0].mlp.down_proj.input_quantizer
    assert not quantizer.dynamic and quantizer.scale.numel() == 1 and quantizer.scale.item() > 0


def test_join_kwargs_concatenates_per_batch_tensors_and_keeps_shared_ones():
    from ptq.calibrate import join_kwargs

    cos = torch.randn(1, 5, 4)
    masks = [torch.randn(3, 1, 5, 5), torch.randn(2, 1, 5, 5)]
    joined = join_kwargs([{"mask": masks[0], "rope": (cos, cos), "use_cache": False},
                          {"mask": masks[1], "rope": (cos.clone(), cos.clone()), "use_cache": False}], [3, 2])
    assert torch.equal(joined["mask"], torch.cat(masks))
    assert joined["rope"][0] is cos and joined["use_cache"] is False
    with pytest.raises(ValueError, match="'rope'"):
        join_kwargs([{"rope": cos}, {"rope": cos + 1}], [3, 2])


class JoinedPass:
    """A step that runs the block once on the joined batches, scaling q_proj's input by 10 on the way."""

    name = "joined"

    def apply(self, ctx: BlockContext) -> None:
        from ptq.calibrate import main_input, replace_main_input

        def scale(module, args, kwargs):
            return replace_main_input(args, kwargs, 10 * main_input(args, kwargs))

        ctx.run_joined({"self_attn.q_proj": scale})


def test_run_joined_outputs_are_the_next_blocks_inputs_in_the_original_batches():
    reference, x = tiny_llama(), samples(n=7)
    spy = BlockInputSpy(1)
    calibrate(copy.deepcopy(reference), LLAMA, x, [spy, JoinedPass()], batch_size=3, progress=False)
    block = reference.model.layers[0]
    handle = block.self_attn.q_proj.register_forward_pre_hook(lambda module, args: (10 * args[0],))
    captured: list[torch.Tensor] = []
    reference.model.layers[1].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    with torch.no_grad():
        reference(x)
    handle.remove()
    torch.testing.assert_close(spy.inputs, captured[0], rtol=1e-5, atol=1e-5)


class EarlyStream:
    """Streams q_proj's inputs and counts how often the MLP ran meanwhile."""

    name = "early"

    def __init__(self) -> None:
        self.seen, self.mlp_calls = 0, 0

    def apply(self, ctx: BlockContext) -> None:
        handle = ctx.module("mlp").register_forward_hook(lambda *args: setattr(self, "mlp_calls", self.mlp_calls + 1))
        ctx.stream({"self_attn.q_proj": lambda x: setattr(self, "seen", self.seen + x.shape[0])})
        handle.remove()


def test_stream_stops_each_batch_once_every_observed_input_is_seen():
    step = EarlyStream()
    calibrate(tiny_llama(), LLAMA, samples(n=7), [step], batch_size=3, progress=False)
    assert step.seen == 2 * 7  # every sequence of both blocks
    assert step.mlp_calls == 0
