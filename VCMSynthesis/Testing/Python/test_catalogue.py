"""The model catalogue is torch-free: listing models and reading their configs and label tables
imports the standard library only, so Slicer's own Python needs no torch for the panel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from VCMSynthesisLib import cli

MODULE_DIR = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "monai", "SimpleITK", "scipy", "numpy")


def imported_modules(*arguments: str, code: str | None = None) -> set[str]:
    """Top-level packages a fresh interpreter imports for `python -m VCMSynthesisLib ARGS` (or `code`)."""
    command = ["-c", code] if code is not None else ["-m", "VCMSynthesisLib", *arguments]
    completed = subprocess.run([sys.executable, "-X", "importtime", *command], capture_output=True, text=True,
                               check=False, cwd=MODULE_DIR, env={"PYTHONPATH": str(MODULE_DIR)})
    assert completed.returncode == 0, completed.stderr[-2000:]
    lines = [line.split("|")[-1] for line in completed.stderr.splitlines() if line.startswith("import time:")]
    return {line.strip().split(".")[0] for line in lines}


def test_listing_models_imports_no_torch_monai_simpleitk_or_scipy():
    modules = imported_modules("models")
    assert "VCMSynthesisLib" in modules  # the import log was read
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_configs_and_label_tables_read_without_torch():
    code = ("from VCMSynthesisLib import registry\n"
            "from VCMSynthesisLib.model_config import CONFIG_NAME, ModelConfig\n"
            "for entry in registry.list_models():\n"
            "    if entry.available:\n"
            "        config = ModelConfig.load(entry.folder / CONFIG_NAME)\n"
            "        print(entry.name, [label.name for label in config.labels])\n")
    modules = imported_modules(code=code)
    assert "VCMSynthesisLib" in modules
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_each_command_is_registered_by_the_module_named_for_it():
    def commands(parser) -> set[str]:
        return set(parser._subparsers._group_actions[0].choices)

    assert commands(cli.build_parser()) == set(cli.SUBCOMMANDS)
    for command, module in cli.SUBCOMMANDS.items():
        own = {name for name, owner in cli.SUBCOMMANDS.items() if owner == module}
        assert commands(cli.build_parser(command)) == own, command
