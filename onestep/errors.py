"""The one exception type the CLI turns into a one-line message (no traceback)."""


class ConfigError(ValueError):
    """Bad user input: a config key, a path, a shape. The message names the culprit and the fix."""
