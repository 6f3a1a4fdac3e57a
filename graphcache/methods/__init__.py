"""The caching methods: one short declarative file each; `get_method(name)` looks them up."""

from ..errors import GraphcacheError
from . import clusca, duca, fora, none, taylorseer, toca
from .base import Method, Option

METHODS: dict[str, Method] = {m.name: m for m in (none.METHOD, fora.METHOD, toca.METHOD, duca.METHOD, taylorseer.METHOD, clusca.METHOD)}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise GraphcacheError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "Method", "Option", "get_method"]
