"""The one exception type every stage raises for bad input."""


class FairforgetError(Exception):
    """A problem the user can fix (bad file, bad flag, unknown model). Scripts print it and exit 2."""
