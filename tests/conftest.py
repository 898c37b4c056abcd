"""Shared pytest configuration for the test suite."""

# Helper scripts that tests start as subprocesses (``_*.py``) are not test modules. With
# ``--doctest-modules`` pytest would import them, and some refuse to run outside their subprocess
# environment (e.g. the Triton interpreter child needs TRITON_INTERPRET=1 set before triton is imported).
collect_ignore_glob = ["_*.py"]
