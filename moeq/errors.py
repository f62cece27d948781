"""User-facing errors: the CLI prints ``str(err)`` on one line and exits non-zero, no traceback."""


class MoeqError(Exception):
    """An error caused by the user's input (paths, recipes, artifacts), reported as one line."""

    exit_code = 2


class ArtifactError(MoeqError):
    """A packed artifact is missing, corrupt, truncated, or written by an unknown codec/version."""


class ModelLoadError(MoeqError):
    """A model could not be found or loaded (missing path, hub unreachable, unsupported file)."""
