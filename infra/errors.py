"""The base of every error a user can cause (a bad flag, file, path, checkpoint or input): the
entry points catch this one type and print its message, one line, exit code 2."""
from __future__ import annotations


class UserError(Exception):
    pass
