"""jaxcls's own exceptions: every user-facing failure is one of these, with a message that names
the file, the field or the tensor at fault."""


class JaxclsError(Exception):
    """Base class; the CLI prints these without a traceback and exits with status 2."""


class CheckpointError(JaxclsError):
    """A checkpoint folder or file is missing, truncated, corrupted or disagrees with its config."""


class DataError(JaxclsError):
    """A dataset file or split is malformed: bad rows, missing columns, unusable labels."""


class DownloadError(JaxclsError):
    """A download failed, was refused by its checksum, or cannot run without network."""


class ConfigError(JaxclsError):
    """A configuration value is invalid; the message names the field."""


class TrainingError(JaxclsError):
    """Training cannot continue (for example a NaN loss); the last good save is kept."""
