"""Model loading and the family mappings that tell transforms where blocks, norms and linears are."""

from ptq.models.loading import (
    EMBEDDED,
    ModelSourceError,
    ResolvedSource,
    check_available,
    load_pretrained,
    load_tokenizer,
    random_llama,
    resolve_source,
)
from ptq.models.mappings import MAPPINGS, Group, Mapping, mapping_for

__all__ = [
    "EMBEDDED",
    "MAPPINGS",
    "Group",
    "Mapping",
    "ModelSourceError",
    "ResolvedSource",
    "check_available",
    "load_pretrained",
    "load_tokenizer",
    "mapping_for",
    "random_llama",
    "resolve_source",
]
