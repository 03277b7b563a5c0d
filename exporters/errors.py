"""Failures of the export step itself, as opposed to bad input."""


class ExportFailed(RuntimeError):
    """An exporter failed on a valid model and input: the CLI reports it and exits with 1."""
