"""The model catalogue is torch-free: listing models and reading their configs and label tables
imports the standard library only, so Slicer's own Python needs no torch for the panel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from VCMSynthesisLib import cli, registry

MODULE_DIR = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "monai", "SimpleITK", "scipy", "numpy")


def imported_modules(*arguments: str, code: str | None = None, env: dict[str, str] | None = None) -> set[str]:
    """Top-level packages a fresh interpreter imports for `python -m VCMSynthesisLib ARGS` (or `code`)."""
    command = ["-c", code] if code is not None else ["-m", "VCMSynthesisLib", *arguments]
    env = {"PYTHONPATH": str(MODULE_DIR), **(env or {})}
    completed = subprocess.run([sys.executable, "-X", "importtime", *command], capture_output=True, text=True,
                               check=False, cwd=MODULE_DIR, env=env)
    assert completed.returncode == 0, completed.stderr[-2000:]
    lines = [line.split("|")[-1] for line in completed.stderr.splitlines() if line.startswith("import time:")]
    return {line.strip().split(".")[0] for line in lines}


def test_listing_models_imports_no_torch_monai_simpleitk_or_scipy():
    modules = imported_modules("models")
    assert "VCMSynthesisLib" in modules  # the import log was read
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_user_registries_are_validated_without_torch(tmp_path):
    """`$VCM_SYNTHESIS_REGISTRY` files are checked (jsonschema where installed) on listing, torch-free."""
    data = json.loads(registry.REGISTRY_PATH.read_text())
    mirror = next(entry for entry in data["models"] if "files" in entry)
    mirror["name"] = "lab-mirror"
    (tmp_path / "lab.json").write_text(json.dumps({"format_version": 1, "models": [mirror]}))
    modules = imported_modules("models", env={registry.REGISTRY_VARIABLE: str(tmp_path / "lab.json"),
                                              registry.HOME_VARIABLE: str(tmp_path / "home")})
    assert {"VCMSynthesisLib", "jsonschema"} <= modules  # validated by jsonschema
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


def test_the_panels_label_table_and_job_export_need_no_torch(tmp_path):
    """What the self-test runs on an extension build machine (no torch): the demo model's label
    table, default segment mapping and a synthesis job exported from a real MRML scene."""
    code = f"""
import sys
import numpy as np
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import slicer_scenes
from VCMSynthesisLib import scene
scene_ = slicer_scenes.new_scene()
reference = slicer_scenes.add_volume(scene_, np.diag([1.5, 1.0, 2.0, 1.0]))
segmentation = slicer_scenes.add_segmentation(scene_, reference, slicer_scenes.blob_labelmap(),
                                              {{1: "CSF", 2: "grey matter", 3: "lesion"}})
labels = scene.model_label_table("demo")
mapping = scene.default_label_mapping(scene.segment_names(segmentation), labels,
                                      scene.segment_label_values(segmentation))
job = scene.write_synthesis_job({str(tmp_path)!r}, segmentation, mapping, model="demo", steps=2)
assert mapping, mapping
assert (job.folder / "segmentation.nrrd").stat().st_size > 0 and "--segmentation" in job.arguments
print(sorted(name for name in sys.modules if name.split(".")[0] in {HEAVY[:-1]!r}))
"""
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                               cwd=MODULE_DIR, env={"PYTHONPATH": str(MODULE_DIR), "PATH": "/usr/bin:/bin"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip().splitlines()[-1] == "[]"
