"""The one exception type for user mistakes: the command line prints it as one line."""


class CadsamError(Exception):
    """Bad input from the user (a file, a flag, a checkpoint): shown without a traceback."""
