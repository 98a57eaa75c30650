"""The one error type of model loading, so callers can print its one-line message and stop."""


class ModelLoadError(RuntimeError):
    """A model that cannot be found or loaded; the message is one line that names the fix."""
