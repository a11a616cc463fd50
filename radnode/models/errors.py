"""The one error type of model loading: the message says which folder or file and what is wrong."""


class ModelError(ValueError):
    """A model folder cannot be used: missing, unreadable or mismatched weights or configuration."""
