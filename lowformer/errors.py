"""The project's error base class: the command line prints these as one line, without a traceback."""


class LowformerError(Exception):
    """An error caused by user input (a name, a file, a config key) whose message says how to fix it."""
