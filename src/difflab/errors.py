"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UsageError(Exception):
    """Bad input or settings: the message says what is wrong and how to fix it."""


class DataError(UsageError):
    """A dataset that cannot be read (missing package, empty folder, bad file)."""


class CheckpointError(UsageError):
    """A run folder or checkpoint that is missing, corrupt or incompatible."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
