"""The one exception type users see: every failure graphcache can explain is a GraphcacheError,
printed by the CLI as a single line with a non-zero exit."""

import re


def one_line(text) -> str:
    """`text` with every run of whitespace (newlines included) as one space."""
    return " ".join(str(text).split())


def exception_line(exc: BaseException, limit: int = 160) -> str:
    """`exc` as "Type: first sentence of its first paragraph", at most `limit` characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    # torch's weights-only failure wraps the real reason in advice that does not apply here.
    text = text.split("WeightsUnpickler error:", 1)[-1].strip()
    text = re.split(r"\n\s*\n", text, maxsplit=1)[0]  # first paragraph
    text = one_line(text).split(". ", 1)[0]  # first sentence
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class GraphcacheError(Exception):
    """A problem with the user's input or model that graphcache can name in one line."""
