"""The one exception type that carries a message meant for the person at the keyboard."""


class CrossStitchError(ValueError):
    """Bad input or a refused file: the message says what was wrong and what would be accepted.

    The CLI prints it as a single ``Error:`` line and exits with code 2; library callers can catch
    it as a ``ValueError``.
    """
