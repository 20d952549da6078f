"""Error types any layer may raise (models, checkpoints, training, the edges); each message is one
line for the user, and the CLI turns them into exit status 2."""


class ConfigError(ValueError):
    """A config that cannot be used: a config file, a model file's config, a table of overrides."""


class ModelLoadError(ValueError):
    """A model file or name that cannot be used."""


class LoraError(ModelLoadError):
    """A LoRA file or name that cannot be used (a 400 on the server)."""
