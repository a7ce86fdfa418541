"""Errors the user can fix; the CLI prints them as one message, without a traceback."""


class InstsegError(Exception):
    """A problem with the user's input: the message names the file/field and the fix."""


class DataError(InstsegError):
    """A dataset root, annotation file or image that cannot be used."""


class TemplateError(InstsegError):
    """An unknown template or a bad hyperparameter override."""


class CheckpointError(InstsegError):
    """A checkpoint that is missing, unreadable, or from an incompatible model."""
