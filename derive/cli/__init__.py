"""The ``derive`` command's implementation: the app and shared helpers (:mod:`derive.cli.app`) and one
module per command family. The entry point is ``cli.main`` (the top-level ``cli.py``)."""
