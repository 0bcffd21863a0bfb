"""Static checks of the Slicer module that need no Slicer: .ui names, parameter names, build lists.

The widget itself only runs inside Slicer (its self-test, `VCMSynthesisTest`); these checks catch
the mistakes that would otherwise only show there: a renamed widget, a file missing from the
extension package, a parameter bound to nothing.
"""

from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import VCMSynthesisLib

MODULE_DIR = Path(__file__).resolve().parents[2]
REPO_DIR = MODULE_DIR.parent
MODULE_FILE = MODULE_DIR / "VCMSynthesis.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "VCMSynthesis.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
WIDGET_API = Path(__file__).resolve().parent / "slicer_widget_api.json"


def ui_object_names() -> set[str]:
    root = ElementTree.parse(UI_FILE).getroot()
    return {widget.get("name") for widget in root.iter("widget")}


def ui_parameter_bindings() -> dict[str, str]:
    """Widget name -> SlicerParameterName dynamic property from the .ui file."""
    bindings = {}
    for widget in ElementTree.parse(UI_FILE).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bindings[widget.get("name")] = prop.find("string").text
    return bindings


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def parameter_node_fields() -> set[str]:
    for node in module_tree().body:
        if isinstance(node, ast.ClassDef) and node.name == "VCMSynthesisParameterNode":
            return {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError("VCMSynthesisParameterNode is not defined in VCMSynthesis.py")


def cmake_listed_files() -> set[str]:
    text = MODULE_CMAKE.read_text(encoding="utf-8").replace("${MODULE_NAME}", "VCMSynthesis")
    return set(re.findall(r"^\s+((?:VCMSynthesis|Resources)[\w./ -]*\.\w+)\s*$", text, flags=re.MULTILINE))


def package_files() -> set[str]:
    """Lib scripts, module scripts and resources that the extension package must contain."""
    files = {"VCMSynthesis.py"}
    library = MODULE_DIR / "VCMSynthesisLib"
    files |= {path.relative_to(MODULE_DIR).as_posix() for path in library.iterdir() if path.is_file()}
    files |= {
        path.relative_to(MODULE_DIR).as_posix()
        for path in (MODULE_DIR / "Resources").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and not path.name.startswith(".")
    }
    return files


def test_slicer_loads_no_other_python_file_as_a_module():
    """Slicer loads every top-level .py among the module's scripts (and in a module folder added
    from a checkout) as a scripted module: only VCMSynthesis.py may be one."""
    text = MODULE_CMAKE.read_text(encoding="utf-8").replace("${MODULE_NAME}", "VCMSynthesis")
    scripts = re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", text, flags=re.DOTALL).group(1).split()
    assert [name for name in scripts if "/" not in name] == ["VCMSynthesis.py"]
    assert [path.name for path in MODULE_DIR.glob("*.py")] == ["VCMSynthesis.py"]
    assert "Resources/Scripts/VCMSynthesisBatch.py" in cmake_listed_files()


def test_every_ui_widget_the_module_uses_exists_in_the_ui_file():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert used, "the module names no widgets: the regular expression or the module changed"
    missing = used - ui_object_names()
    assert not missing, f"VCMSynthesis.py uses widgets missing from {UI_FILE.name}: {sorted(missing)}"


def test_ui_parameter_names_are_parameter_node_fields():
    bindings = ui_parameter_bindings()
    assert {"segmentationSelector", "outputVolumeSelector", "stepsSpinBox"} <= set(bindings)
    unknown = {widget: name for widget, name in bindings.items() if name not in parameter_node_fields()}
    assert not unknown, f"SlicerParameterName values that are no parameter-node field: {unknown}"


def test_no_two_items_share_a_form_layout_cell():
    """Qt's QFormLayout refuses an item for an occupied cell ("Cell (6, 0) already occupied"),
    which leaves that widget outside the layout, drawn over the panel's top corner."""
    for layout in ElementTree.parse(UI_FILE).getroot().iter("layout"):
        if layout.get("class") == "QFormLayout":
            cells = [(item.get("row"), item.get("column")) for item in layout.findall("item")]
            assert len(cells) == len(set(cells)), f"{layout.get('name')}: {sorted(cells)}"


def test_ui_custom_widgets_are_declared():
    root = ElementTree.parse(UI_FILE).getroot()
    declared = {widget.findtext("class") for widget in root.iter("customwidget")}
    used = {widget.get("class") for widget in root.iter("widget")}
    slicer_classes = {name for name in used if name.startswith(("ctk", "qMRML", "qSlicer"))}
    assert slicer_classes <= declared, f"undeclared custom widgets: {sorted(slicer_classes - declared)}"


def test_module_defines_the_scripted_module_classes():
    classes = {node.name for node in module_tree().body if isinstance(node, ast.ClassDef)}
    expected = {"VCMSynthesis", "VCMSynthesisParameterNode", "VCMSynthesisWidget", "VCMSynthesisLogic",
                "VCMSynthesisTest"}
    assert expected <= classes


def test_every_lib_script_and_resource_is_listed_in_cmake():
    listed, present = cmake_listed_files(), package_files()
    # Model folders are taken whole by a glob (they are training outputs).
    assert "file(GLOB_RECURSE MODEL_FILES RELATIVE ${CMAKE_CURRENT_SOURCE_DIR} Resources/Models/*)" in (
        MODULE_CMAKE.read_text(encoding="utf-8")
    )
    present = {path for path in present if not path.startswith("Resources/Models/")}
    assert not present - listed, f"missing from {MODULE_CMAKE}: {sorted(present - listed)}"
    assert not listed - present, f"listed in {MODULE_CMAKE} but absent: {sorted(listed - present)}"


def test_extension_build_files_and_catalog_entry():
    top = (REPO_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS",
                     "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({variable} ", top), variable
    assert "find_package(Slicer REQUIRED)" in top
    assert "add_subdirectory(VCMSynthesis)" in top
    module_cmake = MODULE_CMAKE.read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule" in module_cmake and "WITH_GENERIC_TESTS" in module_cmake
    catalog = json.loads((REPO_DIR / "VCMSynthesis.json").read_text(encoding="utf-8"))
    assert {"scm_url", "scm_revision", "build_subdirectory", "category"} <= set(catalog)
    category = re.search(r'set\(EXTENSION_CATEGORY "([^"]+)"\)', top).group(1)
    assert catalog["category"] == category


def test_every_volume_selector_hides_child_node_types():
    """Label maps are scalar volume nodes' children: without this they are offered as images."""
    for widget in ElementTree.parse(UI_FILE).getroot().iter("widget"):
        if widget.get("class") != "qMRMLNodeComboBox":
            continue
        properties = {prop.get("name"): prop for prop in widget.findall("property")}
        if "vtkMRMLScalarVolumeNode" in [item.text for item in properties["nodeTypes"].iter("string")]:
            shown = properties.get("showChildNodeTypes")
            assert shown is not None and shown.find("bool").text == "false", widget.get("name")
    code = MODULE_FILE.read_text(encoding="utf-8")
    built = code.count("slicer.qMRMLNodeComboBox()")
    assert built >= 1 and code.count(".showChildNodeTypes = False") == built


def test_the_packaged_description_is_whole_and_scene_uses_slicers_constants():
    top = (REPO_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    description = re.search(r'set\(EXTENSION_DESCRIPTION "([^"]+)"\)', top).group(1)
    assert ";" not in description  # CMake splits a string into a list at semicolons
    scene = (MODULE_DIR / "VCMSynthesisLib" / "scene.py").read_text(encoding="utf-8")
    assert "slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY" in scene
    assert not re.search(r"EXTENT_\w+ = \d", scene)


def test_slicer_api_the_module_calls_exists():
    """`slicer.util` helpers and `slicer.vtk*` classes named by the module, batch script and scene glue
    exist in Slicer's own `slicer.util` and MRML wrapping (shipped by the slicer-core wheel)."""
    import slicer

    sources = [MODULE_FILE, MODULE_DIR / "Resources" / "Scripts" / "VCMSynthesisBatch.py",
               MODULE_DIR / "VCMSynthesisLib" / "scene.py"]
    text = "\n".join(path.read_text(encoding="utf-8") for path in sources)
    helpers = set(re.findall(r"slicer\.util\.(\w+)", text))
    classes = set(re.findall(r"slicer\.(vtk\w+)", text))
    assert {"loadUI", "WaitCursor", "setSliceViewerLayers"} <= helpers and "vtkMRMLScene" in classes
    assert not [name for name in helpers if not hasattr(slicer.util, name)]
    assert not [name for name in classes if not hasattr(slicer, name)]
    for event in ("SegmentAdded", "SegmentRemoved"):
        assert hasattr(slicer.vtkSegmentation, event)


def widget_api() -> dict:
    return json.loads(WIDGET_API.read_text(encoding="utf-8"))


def is_qt_class(name: str) -> bool:
    return name.startswith("Q")


def code_objects() -> dict[str, str]:
    """Expression in VCMSynthesis.py -> the Slicer/CTK/Qt class of the object it names."""
    code = MODULE_FILE.read_text(encoding="utf-8")
    objects = {f"self.ui.{name}": widget_class for name, widget_class in ui_widget_classes().items()}
    objects |= dict(re.findall(r"(\w+) = (?:slicer|qt)\.(\w+)\(\)", code))
    objects["slicer.app"] = "qSlicerApplication"
    objects["uiWidget"] = "qMRMLWidget"
    return objects


def ui_widget_classes() -> dict[str, str]:
    widgets = ElementTree.parse(UI_FILE).getroot().iter("widget")
    return {widget.get("name"): widget.get("class") for widget in widgets}


def code_uses() -> list[tuple[str, str, str]]:
    """(class, "signals" | "properties" | "methods", member) for every member the module names on a widget."""
    code = MODULE_FILE.read_text(encoding="utf-8")
    uses = []
    for expression, widget_class in code_objects().items():
        pattern = rf"(?<![\w.]){re.escape(expression)}\.(\w+)(\s*\(\s*\"([^\"]*)\")?(\s*\()?"
        for member, connected, signal, call in re.findall(pattern, code):
            if member == "connect":
                signal = signal.replace(" ", "").replace("constQString&", "QString")
                uses.append((widget_class, "signals", signal))
            else:
                uses.append((widget_class, "methods" if call or connected else "properties", member))
    return uses


def test_the_widget_api_list_names_the_slicer_commits_it_was_checked_against():
    verified = widget_api()["verified_against"]
    assert all(re.search(r"\b[0-9a-f]{40}\b", text) for text in verified.values())
    assert any(version.startswith(f"Slicer {VCMSynthesisLib.MINIMUM_SLICER}") for version in verified)


def test_the_ui_sets_only_listed_properties_of_slicer_and_ctk_widgets():
    api = widget_api()
    for widget in ElementTree.parse(UI_FILE).getroot().iter("widget"):
        widget_class = widget.get("class")
        if is_qt_class(widget_class):
            continue
        assert widget_class in api["classes"], f"{widget_class} is not in {WIDGET_API.name}: check its header"
        known = set(api["classes"][widget_class]["properties"]) | set(api["qt_inherited_properties"])
        for prop in widget.findall("property"):
            if prop.get("stdset") != "0":  # dynamic properties (SlicerParameterName) are the module's own
                assert prop.get("name") in known, f"{widget.get('name')}: {widget_class}.{prop.get('name')}"


def test_the_code_uses_only_listed_signals_properties_and_methods():
    api, uses = widget_api(), code_uses()
    assert ("qMRMLNodeComboBox", "signals", "currentNodeChanged(vtkMRMLNode*)") in uses  # the scan works
    assert ("ctkPathLineEdit", "properties", "currentPath") in uses
    unknown = []
    for widget_class, kind, member in uses:
        if is_qt_class(widget_class):
            continue
        entry = api["classes"].get(widget_class, {})
        allowed = set(entry.get(kind, ()))
        if kind == "properties":
            allowed |= set(api["qt_inherited_properties"])
        if member not in allowed:
            unknown.append(f"{widget_class} {kind} {member}")
    assert not unknown, f"not in {WIDGET_API.name} (check the header, then add): {sorted(set(unknown))}"
