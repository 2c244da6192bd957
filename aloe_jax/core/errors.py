"""Errors a user can cause. The CLI prints them as one line and exits non-zero; anything else is a bug."""


class AloeError(Exception):
    """Base class for mistakes in user input: the message names the input and how to fix it."""


class ConfigError(AloeError):
    """A YAML file, a key=value override or a model config.json is invalid."""


class ModelLoadError(AloeError):
    """A model folder, checkpoint or weights file is missing, incomplete or of an unsupported kind."""


class DataError(AloeError):
    """A data file or record is missing or malformed."""
