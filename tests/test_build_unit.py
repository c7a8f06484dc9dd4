"""build.py's parts, in process and fast (each test kills mutants that `examples/mutation.sh build` found
surviving the end-to-end build tests)."""
from __future__ import annotations
