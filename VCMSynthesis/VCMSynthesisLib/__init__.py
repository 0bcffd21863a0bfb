"""Qt-free core of VCMSynthesis: networks, model folders, conditions, sampling, the worker CLI.

Importable from Slicer, from the worker process, from `training/` and from pytest.
"""

__version__ = "0.1.0"
