class ModelLoadError(ValueError):
    """A model file or name that cannot be used; the message is one line for the user."""
