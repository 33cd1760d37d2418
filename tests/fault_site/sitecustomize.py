"""Imported at start-up by every Python process whose PYTHONPATH holds this folder (tests/fault_injection.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fault_injection  # noqa: E402

fault_injection.install_from_environment()
sys.path.pop(0)
