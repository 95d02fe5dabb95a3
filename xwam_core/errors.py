"""User-facing errors: one line that names the file/key/value and what was expected."""


class XWAMError(Exception):
    """An error caused by the user's input. The CLI prints it as one line and exits non-zero."""


class RecipeError(XWAMError):
    """A recipe file or override that does not match the recipe schema."""


class DataError(XWAMError):
    """A source, store or episode that is missing, corrupt or inconsistent."""
