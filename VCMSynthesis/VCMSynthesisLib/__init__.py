"""Qt-free core of VCMSynthesis: networks, model folders, conditions, sampling, the worker CLI.

Importable from Slicer, from the worker process, from `training/` and from pytest.
"""

import sys

__version__ = "0.1.0"

# The oldest supported Slicer and its Python (Slicer 5.8 ships 3.9.10). pyproject.toml, the
# README, CMakeLists.txt and VCMSynthesis.json name the same; test_python_version.py checks the code.
MINIMUM_SLICER = "5.8"
MINIMUM_PYTHON = (3, 9)


def unsupported_python_message():
    """One line saying that this Python is too old for VCMSynthesis, or None if it is not."""
    if sys.version_info >= MINIMUM_PYTHON:
        return None
    minimum = ".".join(map(str, MINIMUM_PYTHON))
    return (f"VCM Synthesis needs Slicer {MINIMUM_SLICER} or later (Python {minimum} or later); this is "
            f"Python {sys.version.split()[0]}: update Slicer, or choose a newer worker Python")
