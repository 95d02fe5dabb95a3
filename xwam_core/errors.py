"""User-facing errors: one line that names the file/key/value and what was expected."""

from __future__ import annotations


class XWAMError(Exception):
    """An error caused by the user's input. The CLI prints it as one line and exits non-zero."""


class RecipeError(XWAMError):
    """A recipe file or override that does not match the recipe schema."""


class DataError(XWAMError):
    """A source, store or episode that is missing, corrupt or inconsistent."""


def require(ok: bool, key: str, expected: str, value: object) -> None:
    """Refuse a setting outside its range with the recipe's one line, unless `ok`:
    `train.lr: expected a learning rate > 0, got -0.001` (the recipe loader puts the file name in front)."""
    if not ok:
        raise RecipeError(f"{key}: expected {expected}, got {value!r}")
