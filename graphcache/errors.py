"""The one exception type users see: every failure graphcache can explain is a GraphcacheError,
printed by the CLI as a single line with a non-zero exit."""


class GraphcacheError(Exception):
    """A problem with the user's input or model that graphcache can name in one line."""
