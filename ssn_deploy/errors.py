"""Errors a user can cause. Each carries a one-line message the CLI prints as is."""


class SsnDeployError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits with status 1."""


class InputNotFoundError(SsnDeployError):
    """A file, group or dataset named by the user does not exist."""


class InvalidInputError(SsnDeployError):
    """An input exists but has the wrong rank, dtype, axes or values."""


class ShapeMismatchError(InvalidInputError):
    """Two inputs that must align (e.g. segmentation and ground truth) do not."""


class VoxelSizeError(SsnDeployError):
    """The voxel size is unknown or inconsistent; pass ``--voxel-size Z,Y,X``."""


class OutputExistsError(SsnDeployError):
    """An output already exists; pass ``--overwrite`` to replace it."""


class CorruptDataError(SsnDeployError):
    """Stored data cannot be decoded (e.g. a truncated or damaged chunk)."""


class ConfigError(SsnDeployError):
    """A configuration file or option is invalid."""


class ServingError(SsnDeployError):
    """The Triton server's environment, the server or a request to it failed."""


class StorageError(SsnDeployError):
    """The output's storage cannot take it: not writable, read-only, full or over quota."""
