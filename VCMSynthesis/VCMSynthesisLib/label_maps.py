"""Label maps: a segmentation's own label numbers -> a model's labels (`--label-map`).

A user's segmentation rarely uses a model's label values: FreeSurfer and SynthSeg write the
numbers of FreeSurfer's colour table (2 = left cerebral white matter, 17 = left hippocampus, ...).
A label map says which model label each of those numbers is, as data: a JSON file, or a preset
shipped in `Resources/LabelMaps/<name>.json` (`aseg`: FreeSurfer / SynthSeg -> the 8 labels of
`brainldm-vcm-semantics`). `conditions.label_values_to_table` applies it; this module only reads
and checks it (standard library only, so Slicer's own Python can read it too).

    {"description": "one line",
     "map": [{"value": 17, "names": ["Left-Hippocampus"], "label": "hippocampus"},
             {"value": 24, "label": 7}, ...]}

`value`: the number in the segmentation; `label`: the model label it becomes, by name (any case)
or by value, "background" or 0 to leave it out; `names` (optional): segment names that mean the
same number, for Slicer `.seg.nrrd` segmentations whose segments are named after the colour table.
A number the map does not list is an error unless `unmapped` is "background".
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from VCMSynthesisLib.errors import UsageError, UserError

PRESETS_FOLDER = Path(__file__).resolve().parent.parent / "Resources" / "LabelMaps"
UNMAPPED_CHOICES = ("error", "background")
BACKGROUND = "background"
_ROW_KEYS = {"value", "label", "names"}
Key = TypeVar("Key")


@dataclass(frozen=True)
class LabelMap:
    """A checked label map.

    Args:
        source: the preset name or file it was read from (named in messages).
        labels: segmentation value -> model label (its value, or its name).
        values_of_names: segment name (case-folded) -> segmentation value.
        unmapped: what a value the map does not list becomes: "error" or "background".
    """

    source: str
    labels: dict[int, int | str]
    values_of_names: dict[str, int] = field(default_factory=dict)
    description: str = ""
    unmapped: str = "error"

    def resolve(self, table: tuple, model_name: str) -> dict[int, int]:
        """Segmentation value -> model label value (0: left out), every target checked against
        the model's label table (`model_config.Label` rows)."""
        by_name = {label.name.casefold(): label.value for label in table}
        values = {label.value for label in table}
        have = ", ".join(f"{label.value} ({label.name})" for label in table)
        resolved = {}
        for value, target in self.labels.items():
            if isinstance(target, str):
                mapped = 0 if target.casefold() == BACKGROUND else by_name.get(target.casefold())
            else:
                mapped = target if target == 0 or target in values else None
            if mapped is None:
                raise UserError(
                    f"label map '{self.source}' maps {value} to label {target!r}, which model '{model_name}' "
                    f"does not have (its labels: {have}); fix the map or pick the model it was written for"
                )
            resolved[value] = mapped
        return resolved

    def segment_values(self, segments: Mapping[Key, tuple[str, int]], where: str) -> dict[Key, int]:
        """The value each `.seg.nrrd` segment (key -> (name, label value)) stands for: the value
        of its name in the map, else its label value where its name is only that value's
        ("Label_2", "2"). Any other segment is an error, so that a segment called "lesion" does
        not become a label because of its number; with `unmapped` "background" it is 0.
        """
        found, unmatched = {}, []
        for key, (name, label_value) in segments.items():
            named = self.values_of_names.get(name.strip().casefold())
            if named is None and name.strip() in (f"Label_{label_value}", str(label_value)):
                named = label_value
            if named is None:
                unmatched.append(name)
            found[key] = 0 if named is None else named
        if unmatched and self.unmapped != BACKGROUND:
            raise UserError(
                f"segment(s) {', '.join(unmatched)} of '{where}' match no name in label map '{self.source}'; "
                "rename them as the map names them, or pass --unmapped background to leave them out"
            )
        return found


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS_FOLDER.glob("*.json"))


def preset_suggestions(segment_names: Mapping[Key, str], table: list[Mapping]) -> dict[Key, int]:
    """Segment ID -> model label value for segments a preset names ("Left-Hippocampus"), from
    the presets written for this label table (`{"value", "name"}` rows): the panel's suggestion
    for a FreeSurfer segmentation loaded in Slicer."""
    from VCMSynthesisLib.model_config import Label

    labels = tuple(Label(int(row["value"]), str(row["name"])) for row in table)
    suggested: dict[Key, int] = {}
    for name in preset_names():
        preset = read_label_map(name)
        try:
            to_table = preset.resolve(labels, "")
        except UserError:  # a preset for another model
            continue
        for segment_id, segment_name in segment_names.items():
            value = preset.values_of_names.get(segment_name.strip().casefold())
            if value is not None and to_table[value] != 0:
                suggested.setdefault(segment_id, to_table[value])
    return suggested


def label_map_argument(text: str) -> str | Path:
    """`--label-map`: a preset name, or a `.json` file (a Path, so that remote jobs stage it)."""
    if text.lower().endswith(".json") or "/" in text or "\\" in text:
        return Path(text)
    return text


def read_label_map(spec: str | Path, unmapped: str = "error") -> LabelMap:
    """A preset (a name) or a JSON file (a Path), checked; one-line UserError otherwise."""
    if isinstance(spec, str):
        path = PRESETS_FOLDER / f"{spec}.json"
        if not path.is_file():
            raise UserError(f"there is no label map '{spec}'; give a preset ({', '.join(preset_names())}) "
                            "or a .json file")
        source = spec
    else:
        path, source = Path(spec), str(spec)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"label map '{source}' does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read label map '{source}' ({error}); give a readable JSON file") from None
    except json.JSONDecodeError as error:
        raise UserError(f"label map '{source}' is not JSON ({error.msg} at line {error.lineno}); "
                        "fix the file") from None
    return _parse(data, source, unmapped)


def _parse(data, source: str, unmapped: str) -> LabelMap:
    def refuse(problem: str) -> UserError:
        return UserError(f"label map '{source}': {problem}; see README.md (Label maps) for the format")

    if unmapped not in UNMAPPED_CHOICES:
        raise UsageError(f"--unmapped takes {' or '.join(UNMAPPED_CHOICES)}, not {unmapped!r}")
    if not isinstance(data, dict) or not isinstance(data.get("map"), list) or not data["map"]:
        raise refuse('it needs a non-empty "map" list')
    extra = set(data) - {"map", "description"}
    if extra:
        raise refuse(f"unknown field(s) {', '.join(sorted(extra))}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise refuse('"description" must be a string')
    labels: dict[int, int | str] = {}
    values_of_names: dict[str, int] = {}
    for number, row in enumerate(data["map"], start=1):
        if not isinstance(row, dict) or not {"value", "label"} <= set(row) or set(row) - _ROW_KEYS:
            raise refuse(f'row {number} must be an object with "value", "label" and optionally "names"')
        value, target, names = row["value"], row["label"], row.get("names", [])
        if not _is_int(value) or value < 0:
            raise refuse(f'row {number}: "value" must be a label number (an integer from 0), not {value!r}')
        if not (_is_int(target) and target >= 0) and not (isinstance(target, str) and target.strip()):
            raise refuse(f'row {number}: "label" must be a model label\'s name or value, not {target!r}')
        if value in labels:
            raise refuse(f"value {value} is listed twice (rows {list(labels).index(value) + 1} and {number})")
        if not isinstance(names, list) or not all(isinstance(name, str) and name.strip() for name in names):
            raise refuse(f'row {number}: "names" must be a list of segment names')
        for name in names:
            if name.strip().casefold() in values_of_names:
                raise refuse(f"segment name '{name}' is listed twice")
            values_of_names[name.strip().casefold()] = value
        labels[value] = target.strip() if isinstance(target, str) else target
    return LabelMap(source=source, labels=labels, values_of_names=values_of_names, description=description,
                    unmapped=unmapped)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def add_label_map_arguments(parser: argparse.ArgumentParser) -> None:
    """`--label-map NAME|FILE.json` and `--unmapped`, for every command that reads a segmentation."""
    parser.add_argument("--label-map", type=label_map_argument, metavar="NAME|FILE.json",
                        help="turn the segmentation's own label numbers into the model's labels: a preset "
                             f"({', '.join(preset_names())}: FreeSurfer / SynthSeg) or a JSON file")
    parser.add_argument("--unmapped", choices=UNMAPPED_CHOICES,
                        help="--label-map: a value the map does not list is an error (default) or "
                             "background")


def label_map_of(args: argparse.Namespace) -> LabelMap | None:
    """The label map a parsed command line names (None without `--label-map`)."""
    if args.label_map is None:
        if args.unmapped is not None:
            raise UsageError("--unmapped goes with --label-map")
        return None
    return read_label_map(args.label_map, args.unmapped or "error")
