"""The one exception type for problems the user can fix (bad input, bad options, bad files).

The CLI prints it as one line and exits 2; the widgets show it as a message. It subclasses
``ValueError`` so that callers catching ``ValueError`` keep working. Code never branches on the
text of an error message: raise (or catch) this type instead.
"""

from __future__ import annotations


class GlasSegError(ValueError):
    """A user error: the message says what is wrong and what to do, on one line."""
