"""The ``crossstitch`` command line: parses, calls the library, renders."""
