"""Registry of named methods. Adding one: a module defining a ``Method``, listed here, and its test."""

from fimlora.errors import FimloraError
from fimlora.methods.base import AllocationRequest, Method
from fimlora.methods.fim_lora import FIM_LORA
from fimlora.methods.lora import LORA
from fimlora.methods.random_rank import RANDOM_RANK

METHODS: dict[str, Method] = {m.name: m for m in (LORA, FIM_LORA, RANDOM_RANK)}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise FimloraError(f"Unknown method {name!r}; available: {', '.join(METHODS)}.") from None


__all__ = ["METHODS", "AllocationRequest", "Method", "get_method"]
