"""Exceptions that the CLI maps to exit codes (2 for bad input or usage, 1 for internal errors)."""


class InputError(Exception):
    """Bad user input: a missing or malformed file, tensor or option. The message names the culprit."""


class SafemergeWarning(UserWarning):
    """A warning of safemerge itself (not of a library it uses): the CLI prints it once, styled, and the
    engine also records it in the report's `warnings`."""
