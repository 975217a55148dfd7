"""ptq: post-training quantization for language models (observers, transforms, kernels, evaluation)."""

__version__ = "0.1.0"
