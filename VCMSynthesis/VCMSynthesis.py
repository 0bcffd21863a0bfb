"""VCM Synthesis: controllable 3D image synthesis from segmentations in 3D Slicer.

Thin Slicer front end. The scene glue (`VCMSynthesisLib.scene`) and the background worker runs
(`VCMSynthesisLib.jobs`) are Qt-free and tested with the slicer-core wheel; this file holds the
panel, the parameter node, the logic that ties them together and the self-test.
"""

import logging
import shutil
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from VCMSynthesisLib import unsupported_python_message

if unsupported_python_message():  # one line in Slicer's log instead of a syntax error further down
    raise RuntimeError(unsupported_python_message())

from VCMSynthesisLib import jobs, registry, remote, scene  # noqa: E402
from VCMSynthesisLib.errors import UserError  # noqa: E402
from VCMSynthesisLib.model_config import CONFIG_NAME, SAMPLING_SCHEDULERS, ModelConfig  # noqa: E402
from VCMSynthesisLib.runtime import DEVICES  # noqa: E402
from VCMSynthesisLib.worker import DEFAULT_PREVIEW_EVERY as PREVIEW_EVERY  # noqa: E402

MODULE_DIR = Path(__file__).resolve().parent
SAMPLE_DATA_DIR = MODULE_DIR / "Resources" / "SampleData"
ICON_PATH = MODULE_DIR / "Resources" / "Icons" / "VCMSynthesis.png"
NOT_USED = "(not used)"  # the label of scene.NOT_USED in the segment table
POLL_INTERVAL_MS = 200


#
# VCMSynthesis
#


class VCMSynthesis(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("VCM Synthesis")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Synthesis")]
        self.parent.dependencies = []
        self.parent.contributors = ["VCMSynthesis contributors"]
        self.parent.helpText = _(
            "Synthesize a 3D image from a segmentation (and optional modality volumes) with a "
            "Volumetric Conditioning Module steering a frozen 3D latent diffusion model, or "
            "restore thin slices from a thick-slice scan (axial super-resolution). The synthesis "
            "runs in a background process: the application stays responsive and Cancel stops it. "
            "See the <a href=\"https://github.com/vcm-synthesis/SlicerVCMSynthesis\">documentation</a>."
        )
        self.parent.acknowledgementText = _(
            "Based on: S. Ahn et al., \"Volumetric Conditioning Module to Control Pretrained "
            "Diffusion Models for 3D Medical Images\", WACV 2025 (arXiv:2410.21826). Base model: "
            "BrainLDM (Pinaya et al., 2022) from the MONAI model zoo. Built with MONAI."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Offer the shipped demo conditions in the Sample Data module (two clicks to a first run)."""
    import SampleData

    for path in sorted(SAMPLE_DATA_DIR.glob("*")):
        lowerName = path.name.lower()
        if not lowerName.endswith((".nrrd", ".nii.gz")):
            continue  # copyright notices and the like
        name = path.name.split(".")[0]
        # Label maps load as segmentations (segments keep their label values, which the panel maps).
        fileType = "SegmentationFile" if ".seg." in lowerName or "label" in lowerName else "VolumeFile"
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="VCM Synthesis",
            sampleName=name,
            thumbnailFileName=str(ICON_PATH),
            uris=path.as_uri(),
            fileNames=path.name,
            nodeNames=name,
            loadFileTypes=fileType,
        )


#
# VCMSynthesisParameterNode
#


@parameterNodeWrapper
class VCMSynthesisParameterNode:
    """The panel's state, saved with the scene.

    inputSegmentation - segments that become the label condition.
    referenceVolume - grid of the result; None: the segmentation's reference geometry.
    outputVolume - volume replaced by the result on success; None: a new volume.
    superResolutionInput - thick-slice volume for axial super-resolution.
    editScan - the scan that *Edit the loaded scan* re-synthesizes where the segmentation changed.
    editMarginMm - blend zone around the edited voxels.
    livePreview - show the predicted image every few steps while Synthesize runs.
    samples - draws averaged into the result; from 2 on, their spread comes as a second volume.
    steps, scheduler, strength - the sampling; set to the model's defaults on model change.
    """

    inputSegmentation: vtkMRMLSegmentationNode
    referenceVolume: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    superResolutionInput: vtkMRMLScalarVolumeNode
    editScan: vtkMRMLScalarVolumeNode
    editMarginMm: Annotated[float, WithinRange(0.0, 50.0)] = 8.0
    livePreview: bool = False
    samples: Annotated[int, WithinRange(1, 64)] = 1
    model: str = "demo"
    steps: Annotated[int, WithinRange(1, 1000)] = 25  # set to the model's default on model change
    scheduler: str = "ddim"  # a key of SAMPLING_SCHEDULERS; set to the model's default on model change
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    strength: Annotated[float, WithinRange(0.0, 4.0)] = 1.0
    device: str = "auto"


#
# VCMSynthesisWidget
#


class VCMSynthesisWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._lastLogPath = None
        self._observedSegmentation = None
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollRun)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VCMSynthesis.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = VCMSynthesisLogic()

        self.ui.deviceComboBox.addItems(list(DEVICES))
        for name, shown in SAMPLING_SCHEDULERS.items():
            self.ui.schedulerComboBox.addItem(shown, name)
        self.ui.pythonExecutablePathLineEdit.currentPath = self.logic.configuredWorkerPython()
        self.ui.serverUrlLineEdit.text = self.logic.serverUrl()
        self.ui.serverTokenPathLineEdit.currentPath = self.logic.serverTokenFile()
        self.populateModels()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.superResolutionButton.connect("clicked(bool)", self.onSuperResolutionButton)
        self.ui.startEditingButton.connect("clicked(bool)", self.onStartEditing)
        self.ui.regenerateButton.connect("clicked(bool)", self.onRegenerateButton)
        self.ui.showLogButton.connect("clicked(bool)", self.onShowLog)
        self.ui.checkDependenciesButton.connect("clicked(bool)", self.onCheckDependencies)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.schedulerComboBox.connect("currentIndexChanged(int)", self.onSchedulerChanged)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.pythonExecutablePathLineEdit.connect(
            "currentPathChanged(QString)", self.logic.setWorkerPython
        )
        self.ui.serverUrlLineEdit.connect("textChanged(QString)", self.logic.setServerUrl)
        self.ui.serverTokenPathLineEdit.connect("currentPathChanged(QString)", self.logic.setServerTokenFile)
        self.ui.checkServerButton.connect("clicked(bool)", self.onCheckServer)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._pollTimer.stop()
        self.logic.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.cancel()
        self.logic.editSession = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event) -> None:
        """A loaded scene brings its own parameter node: show its segment labels and modality volumes."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.ui.deviceComboBox.currentText = self._parameterNode.device
            self.showScheduler()
            modelIndex = self.ui.modelComboBox.findData(self._parameterNode.model)
            if modelIndex >= 0:
                self.ui.modelComboBox.currentIndex = modelIndex
            self.updateSegmentMapping()
            self.updateModalityTable()
            self.updateButtons()

    # Models and condition tables

    def populateModels(self) -> None:
        """Fill the model list (again after *Check dependencies*), keeping the chosen model."""
        chosen = self._parameterNode.model if self._parameterNode else None
        self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        try:
            for entry in self.logic.models():
                self.ui.modelComboBox.addItem(f"{entry.name} ({entry.task})", entry.name)
        except UserError as error:
            self.ui.modelDescriptionLabel.text = str(error)
        if chosen and self.ui.modelComboBox.findData(chosen) >= 0:
            self.ui.modelComboBox.currentIndex = self.ui.modelComboBox.findData(chosen)
        self.ui.modelComboBox.blockSignals(False)
        self.onModelChanged()

    def currentModel(self):
        name = self.ui.modelComboBox.currentData
        return self.logic.modelEntry(name) if name else None

    def onModelChanged(self, index=None) -> None:
        entry = self.currentModel()
        if entry is None:
            return
        if self._parameterNode:
            self._parameterNode.model = entry.name
        description = entry.description
        if not entry.available:
            description += " " + _("(not downloaded yet: see Set-up in the documentation)")
        config = self.logic.modelConfig(entry.name)
        if config is not None:
            description += " " + scene.sampling_summary(config)
        self.ui.modelDescriptionLabel.text = description
        if self._parameterNode and config is not None:  # the model's defaults, shown and used
            self._parameterNode.steps = config.sampling_steps
            self._parameterNode.scheduler = config.sampling_scheduler
            self._parameterNode.strength = config.sampling_strength
            self.showScheduler()
        self.updateSegmentMapping()
        self.updateModalityTable()

    def onDeviceChanged(self, index) -> None:
        if self._parameterNode:
            self._parameterNode.device = self.ui.deviceComboBox.currentText

    def showScheduler(self) -> None:
        """The sampler combo box shows the parameter node's scheduler (by name; it lists labels)."""
        index = self.ui.schedulerComboBox.findData(self._parameterNode.scheduler)
        if index >= 0:
            self.ui.schedulerComboBox.currentIndex = index

    def onSchedulerChanged(self, index) -> None:
        if self._parameterNode and self.ui.schedulerComboBox.currentData:
            self._parameterNode.scheduler = self.ui.schedulerComboBox.currentData

    def onSegmentationChanged(self, node) -> None:
        """Follow segments added or removed (e.g. in Segment Editor) while the module is open."""
        for event in (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved):
            if self._observedSegmentation is not None:
                self.removeObserver(self._observedSegmentation, event, self.updateSegmentMapping)
            if node is not None:
                self.addObserver(node, event, self.updateSegmentMapping)
        self._observedSegmentation = node
        self.updateSegmentMapping()

    def moduleNode(self):
        """The parameter node itself (vtkMRMLScriptedModuleNode), for the choices `scene` keeps on it."""
        return self._parameterNode.parameterNode if self._parameterNode else None

    def updateSegmentMapping(self, *args) -> None:
        """One row per segment; its combobox picks the model label: the choice saved with the scene,
        else the name match, else (not used) (`scene.panel_label_mapping`)."""
        table = self.ui.segmentMappingTable
        table.setRowCount(0)
        segmentationNode = self.ui.segmentationSelector.currentNode()
        name = self.ui.modelComboBox.currentData
        if segmentationNode is None or not name:
            return
        names = scene.segment_names(segmentationNode)
        try:
            labels = [label for label in self.logic.labelTable(name) if label["value"] != 0]
        except UserError as error:
            self.showStatus(str(error), error=True)
            return
        saved = scene.saved_label_mapping(self.moduleNode(), segmentationNode) if self.moduleNode() else {}
        shown = scene.panel_label_mapping(names, labels, scene.segment_label_values(segmentationNode), saved)
        table.setRowCount(len(names))
        for row, (segmentId, name) in enumerate(names.items()):
            item = qt.QTableWidgetItem(name)
            item.setData(qt.Qt.UserRole, segmentId)
            item.setFlags(qt.Qt.ItemIsEnabled)
            table.setItem(row, 0, item)
            comboBox = qt.QComboBox()
            comboBox.addItem(NOT_USED, scene.NOT_USED)
            for label in labels:
                comboBox.addItem(f"{label['value']}: {label['name']}", label["value"])
            comboBox.currentIndex = comboBox.findData(shown[segmentId])
            comboBox.connect("currentIndexChanged(int)", self.onSegmentLabelChanged)
            table.setCellWidget(row, 1, comboBox)
        self.updateButtons()

    def onSegmentLabelChanged(self, index=None) -> None:
        """Keep the table's choices ((not used) too) on the parameter node: saved with the scene."""
        segmentationNode = self.ui.segmentationSelector.currentNode()
        if self.moduleNode() and segmentationNode is not None:
            mapping = self.segmentMapping(keepUnused=True)
            scene.save_label_mapping(self.moduleNode(), segmentationNode, mapping)
        self.updateButtons()

    def segmentMapping(self, keepUnused: bool = False) -> dict:
        """Segment ID -> model label value from the table (`scene.NOT_USED` rows too if `keepUnused`)."""
        table = self.ui.segmentMappingTable
        mapping = {}
        for row in range(table.rowCount):
            value = table.cellWidget(row, 1).currentData
            if value is not None:
                mapping[table.item(row, 0).data(qt.Qt.UserRole)] = int(value)
        return mapping if keepUnused else scene.used_labels(mapping)

    def updateModalityTable(self) -> None:
        table = self.ui.modalityTable
        table.setRowCount(0)
        try:
            config = self.logic.modelConfig(self.ui.modelComboBox.currentData)
        except UserError as error:
            self.showStatus(str(error), error=True)
            config = None
        modalities = [modality.name for modality in config.modalities] if config else []
        saved = scene.saved_modality_volumes(self.moduleNode(), modalities) if self.moduleNode() else {}
        table.setRowCount(len(modalities))
        for row, name in enumerate(modalities):
            item = qt.QTableWidgetItem(name)
            item.setFlags(qt.Qt.ItemIsEnabled)
            table.setItem(row, 0, item)
            selector = slicer.qMRMLNodeComboBox()
            selector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
            selector.showChildNodeTypes = False  # label maps are no modality images
            selector.noneEnabled = True
            selector.addEnabled = False
            selector.removeEnabled = False
            selector.setMRMLScene(slicer.mrmlScene)
            selector.setCurrentNode(saved.get(name))
            selector.connect("currentNodeChanged(vtkMRMLNode*)",
                             lambda node, name=name: self.onModalityVolumeChanged(name, node))
            table.setCellWidget(row, 1, selector)
        table.setVisible(bool(modalities))

    def onModalityVolumeChanged(self, name: str, node) -> None:
        """Keep the volume chosen for a modality channel on the parameter node (saved with the scene)."""
        if self.moduleNode():
            scene.save_modality_volume(self.moduleNode(), name, node)
        self.updateButtons()

    def modalityNodes(self) -> dict:
        table = self.ui.modalityTable
        nodes = {}
        for row in range(table.rowCount):
            node = table.cellWidget(row, 1).currentNode()
            if node is not None:
                nodes[table.item(row, 0).text()] = node
        return nodes

    # Running

    def updateButtons(self, *args) -> None:
        running = self.logic is not None and self.logic.isRunning()
        synthesizing = running and self.logic.activeTask == "synthesis"
        superResolving = running and self.logic.activeTask == "superres"
        editing = running and self.logic.activeTask == "edit"
        self.ui.applyButton.text = _("Cancel") if synthesizing else _("Synthesize")
        self.ui.superResolutionButton.text = _("Cancel") if superResolving else _("Axial super-resolution")
        self.ui.regenerateButton.text = _("Cancel") if editing else _("Regenerate edited region")
        segmentationReady = bool(
            self._parameterNode and self._parameterNode.inputSegmentation and self.segmentMapping()
        )
        ready = segmentationReady or bool(self.modalityNodes())
        self.ui.applyButton.enabled = synthesizing or (not running and ready)
        superResolutionReady = bool(self._parameterNode and self._parameterNode.superResolutionInput)
        self.ui.superResolutionButton.enabled = superResolving or (not running and superResolutionReady)
        self.ui.startEditingButton.enabled = not running and bool(
            self._parameterNode and self._parameterNode.editScan and self._parameterNode.inputSegmentation
        )
        editReady = bool(self.logic and self.logic.editSession and self.segmentMapping())
        self.ui.regenerateButton.enabled = editing or (not running and editReady)
        self.ui.showLogButton.enabled = self._lastLogPath is not None

    def onApplyButton(self) -> None:
        if self.logic.isRunning():
            self.logic.cancel()
            return
        parameters = self._parameterNode
        self.startRun(
            lambda: self.logic.startSynthesis(
                # Models without labels (translation) take the modality volumes only.
                parameters.inputSegmentation if self.logic.labelTable(parameters.model) else None,
                self.segmentMapping(),
                model=parameters.model,
                referenceVolumeNode=parameters.referenceVolume,
                modalityNodes=self.modalityNodes(),
                seed=parameters.seed,
                device=parameters.device,
                outputVolumeNode=parameters.outputVolume,
                previewEvery=PREVIEW_EVERY if parameters.livePreview else None,
                samples=parameters.samples,
                **self.changedSampling(),
            )
        )

    def onSuperResolutionButton(self) -> None:
        if self.logic.isRunning():
            self.logic.cancel()
            return
        parameters = self._parameterNode
        changed = self.changedSampling()
        self.startRun(
            lambda: self.logic.startSuperResolution(
                # The super-resolution model's own defaults, but for the steps and sampler the user changed.
                parameters.superResolutionInput, steps=changed["steps"], scheduler=changed["scheduler"],
                seed=parameters.seed, device=parameters.device,
            )
        )

    def onStartEditing(self) -> None:
        parameters = self._parameterNode
        try:
            self.logic.startEditing(parameters.editScan, parameters.inputSegmentation)
        except UserError as error:
            self.showStatus(str(error), error=True)
            return
        self.showStatus(_("Remembered '{name}' as it is now: change it in Segment Editor, then press "
                          "Regenerate edited region.").format(name=parameters.inputSegmentation.GetName()))
        self.updateButtons()

    def onRegenerateButton(self) -> None:
        if self.logic.isRunning():
            self.logic.cancel()
            return
        parameters = self._parameterNode
        self.startRun(
            lambda: self.logic.startEdit(
                self.segmentMapping(), model=parameters.model, marginMm=parameters.editMarginMm,
                seed=parameters.seed, samples=parameters.samples, device=parameters.device,
                **self.changedSampling(),
                outputVolumeNode=parameters.outputVolume,
            )
        )

    def changedSampling(self) -> dict:
        """`steps`/`scheduler`/`strength` for a job: None where the panel shows the model's default."""
        parameters = self._parameterNode
        return scene.changed_sampling(self.logic.modelConfig(parameters.model), steps=parameters.steps,
                                      scheduler=parameters.scheduler, strength=parameters.strength)

    def startRun(self, start) -> None:
        if not self.logic.workerHasDependencies(askToInstall=True):
            return
        try:
            run = start()
        except UserError as error:
            self.showStatus(str(error), error=True)
            return
        self._lastLogPath = run.job.log_path
        self.ui.progressBar.visible = True
        self.ui.progressBar.value = 0
        self.ui.dependencyStatusLabel.text = self.logic.lastEnvironmentSummary
        status = _("Starting the worker (loading the model)...")
        if self.logic.cpuOnly:
            status += " " + _("Only the CPU is available: this takes minutes.")
        self.showStatus(status)
        self._pollTimer.start()
        self.updateButtons()

    def onPollRun(self) -> None:
        for progress in self.logic.poll():
            self.ui.progressBar.value = int(100 * progress.fraction)
            status = _("Step {step} of {total}").format(step=progress.step, total=progress.total)
            if progress.eta_s is not None:
                status += _(", about {seconds} s left").format(seconds=round(progress.eta_s))
            self.showStatus(status)
        if self.logic.isRunning():
            return
        self._pollTimer.stop()
        self.ui.progressBar.visible = False
        try:
            node, outcome = self.logic.finish()
        except UserError as error:
            self.showStatus(str(error), error=True)
        else:
            if node is None:
                self.showStatus(_("Cancelled: the scene is unchanged."))
            else:
                # The output selector stays as it was: with "Create new volume", each run (another
                # seed, say) adds a volume instead of replacing the last one.
                seconds = float(outcome.timings.get("total_s") or 0.0)
                status = _("Done: '{name}' ({seconds:.0f} s).").format(name=node.GetName(), seconds=seconds)
                self.showStatus(" ".join([status, *(_("Warning: ") + text for text in outcome.warnings)]))
        self.updateButtons()

    def showStatus(self, text: str, error: bool = False) -> None:
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c0392b" if error else "")
        if error:
            logging.error(text)

    def onShowLog(self) -> None:
        if self._lastLogPath is not None:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(self._lastLogPath)))

    def onCheckServer(self) -> None:
        with slicer.util.WaitCursor():
            self.ui.serverStatusLabel.text = self.logic.checkServer()

    def onCheckDependencies(self) -> None:
        self.logic.workerHasDependencies(askToInstall=True)
        self.ui.dependencyStatusLabel.text = self.logic.lastEnvironmentSummary
        self.populateModels()  # e.g. a model downloaded or placed by hand meanwhile


#
# VCMSynthesisLogic
#


class VCMSynthesisLogic(ScriptedLoadableModuleLogic):
    """Runs synthesis, super-resolution and edit jobs on scene nodes; usable without the widget.

    Start a run with `startSynthesis`, `startSuperResolution` or (after `startEditing`)
    `startEdit`, `poll()` it (from a QTimer),
    then `finish()` puts the result into the scene. `process` does all three, blocking.
    """

    PYTHON_SETTING = "VCMSynthesis/PythonExecutable"
    SERVER_URL_SETTING = "VCMSynthesis/ServerURL"
    SERVER_TOKEN_SETTING = "VCMSynthesis/ServerTokenFile"  # the file's path; the token stays in the file

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._run = None
        self._target = None
        self.activeTask = None
        self.editSession = None  # scene.EditSession while *Edit the loaded scan* is on
        self._previewNode = None  # the live preview volume of the running job
        self._shownPreview = None  # (path, step) of the preview it shows
        self.lastEnvironmentSummary = ""
        self.cpuOnly = False
        self._completeWorkerPythons = set()

    def getParameterNode(self):
        return VCMSynthesisParameterNode(super().getParameterNode())

    # Worker Python and its dependencies

    def configuredWorkerPython(self) -> str:
        return str(qt.QSettings().value(self.PYTHON_SETTING, "") or "")

    def setWorkerPython(self, path: str) -> None:
        qt.QSettings().setValue(self.PYTHON_SETTING, path or "")

    def workerPython(self) -> str:
        return self.configuredWorkerPython() or jobs.default_python()

    # Remote server (`vcm-synthesis serve`): runs go there when a URL is set

    def serverUrl(self) -> str:
        return str(qt.QSettings().value(self.SERVER_URL_SETTING, "") or "").strip()

    def setServerUrl(self, url: str) -> None:
        qt.QSettings().setValue(self.SERVER_URL_SETTING, (url or "").strip())

    def serverTokenFile(self) -> str:
        return str(qt.QSettings().value(self.SERVER_TOKEN_SETTING, "") or "")

    def setServerTokenFile(self, path: str) -> None:
        qt.QSettings().setValue(self.SERVER_TOKEN_SETTING, path or "")

    def checkServer(self) -> str:
        """*Check server*: the server's version, device and models, or why it cannot be used."""
        if not self.serverUrl():
            return _("No server URL: runs use the worker Python on this computer.")
        try:
            return remote.check_server(self.serverUrl(), self.serverTokenFile() or None)
        except UserError as error:
            return str(error)

    def workerHasDependencies(self, askToInstall: bool = True) -> bool:
        """Check the worker Python; for Slicer's own Python offer a one-confirmation install.

        A Python found complete is not probed again in this session (probing imports torch).
        With a server URL set, runs go to the server and need nothing here.
        """
        if self.serverUrl():
            return True
        if self.workerPython() in self._completeWorkerPythons:
            return True
        with slicer.util.WaitCursor():
            try:
                environment = jobs.probe_worker_python(self.workerPython())
            except UserError as error:
                self.lastEnvironmentSummary = str(error)
                slicer.util.errorDisplay(str(error))
                return False
        self.lastEnvironmentSummary = environment.summary()
        self.cpuOnly = not environment.cuda
        if not environment.missing:
            self._completeWorkerPythons.add(environment.python)
            return True
        if self.configuredWorkerPython():
            slicer.util.errorDisplay(
                _("The worker Python is missing {requirements}. Install them into it, or clear the "
                  "Worker Python setting to use Slicer's own Python.").format(
                    requirements=", ".join(environment.missing_requirements))
            )
            return False
        if not askToInstall or not slicer.util.confirmOkCancelDisplay(
            _("VCM Synthesis needs {requirements} in Slicer's Python. Install them now? This downloads "
              "about 1-3 GB and takes a few minutes.").format(
                requirements=", ".join(environment.missing_requirements))
        ):
            return False
        self.installDependencies(environment.missing)
        environment = jobs.probe_worker_python(self.workerPython())
        self.lastEnvironmentSummary = environment.summary()
        self.cpuOnly = not environment.cuda
        if environment.missing:
            slicer.util.errorDisplay(self.lastEnvironmentSummary)
            return False
        self._completeWorkerPythons.add(environment.python)
        if not environment.cuda:
            slicer.util.infoDisplay(self.lastEnvironmentSummary)
        return True

    @staticmethod
    def installDependencies(missing) -> None:
        """torch through the PyTorch extension when it is installed (it picks the CUDA build)."""
        others = [jobs.WORKER_REQUIREMENTS[name] for name in missing if name != "torch"]
        with slicer.util.WaitCursor():
            if "torch" in missing:
                if hasattr(slicer.modules, "pytorchutils"):
                    import PyTorchUtils

                    torchRange = jobs.WORKER_REQUIREMENTS["torch"][len("torch"):]
                    PyTorchUtils.PyTorchUtilsLogic().installTorch(
                        askConfirmation=False, torchVersionRequirement=torchRange
                    )
                else:
                    slicer.util.pip_install(jobs.WORKER_REQUIREMENTS["torch"])
            if others:
                slicer.util.pip_install(others)

    # Models

    def models(self):
        """Registry entries (shipped, downloadable, the user's own); reads JSON only, no torch."""
        return registry.list_models()

    def modelEntry(self, name: str):
        return next((entry for entry in self.models() if entry.name == name), None)

    def modelConfig(self, name: str):
        """The model's checked config.json, or None while it is not downloaded (no torch needed)."""
        entry = self.modelEntry(name) if name else None
        if entry is None or not entry.available:
            return None
        return ModelConfig.load(entry.folder / CONFIG_NAME)

    def labelTable(self, name: str) -> list:
        """[{"value", "name"}] of the model's labels; empty while it is not downloaded."""
        entry = self.modelEntry(name) if name else None
        return scene.model_label_table(name) if entry is not None and entry.available else []

    # Runs

    def isRunning(self) -> bool:
        return self._run is not None and self._run.running

    def startSynthesis(
        self,
        segmentationNode,
        labelOfSegment: dict,
        *,
        model: str,
        referenceVolumeNode=None,
        modalityNodes=None,
        steps=None,
        scheduler=None,
        seed=None,
        strength=None,
        device: str = "auto",
        outputVolumeNode=None,
        previewEvery=None,
        samples=None,
    ):
        """Export the conditions and start the worker; the scene is not touched until `finish`
        (but for the live preview volume, every `previewEvery` steps, which `finish` removes).

        `segmentationNode` may be None for models that take modality volumes only (translation).
        """
        if self.isRunning():
            raise UserError(_("a run is already in progress; wait for it or cancel it"))
        job = self._writeJob(
            scene.write_synthesis_job, segmentationNode, labelOfSegment, model=model,
            reference_volume_node=referenceVolumeNode, modality_nodes=modalityNodes, steps=steps,
            scheduler=scheduler, seed=seed, strength=strength, device=device, preview_every=previewEvery,
            samples=samples,
        )
        inputNode = segmentationNode or next(iter(modalityNodes.values()))
        name = inputNode.GetName() + " synthesized"
        return self._start(job, "synthesis", outputVolumeNode, name, inputNode)

    def startSuperResolution(self, volumeNode, *, model=None, spacing=None, samples=None, steps=None,
                             scheduler=None, seed=None, device="auto", outputVolumeNode=None):
        """Export the thick-slice volume and start `vcm-synthesis superres` on it."""
        if self.isRunning():
            raise UserError(_("a run is already in progress; wait for it or cancel it"))
        if volumeNode is None:
            raise UserError(_("no thick-slice volume selected; pick one"))
        job = self._writeJob(
            scene.write_superres_job, volumeNode, model=model, spacing=spacing, samples=samples, steps=steps,
            scheduler=scheduler, seed=seed, device=device,
        )
        name = volumeNode.GetName() + " super-resolved"
        return self._start(job, "superres", outputVolumeNode, name, volumeNode)

    def startEditing(self, scanNode, segmentationNode) -> None:
        """*Edit the loaded scan*: remember the segmentation as it is now (`scene.EditSession`)."""
        self.editSession = scene.EditSession(scanNode, segmentationNode)

    def startEdit(self, labelOfSegment: dict, *, model: str, marginMm=None, steps=None, scheduler=None,
                  seed=None, strength=None, samples=None, device: str = "auto", outputVolumeNode=None):
        """Start `vcm-synthesis edit` on what changed since `startEditing`; the scan stays as it is."""
        if self.isRunning():
            raise UserError(_("a run is already in progress; wait for it or cancel it"))
        if self.editSession is None:
            raise UserError(_("press Start editing before changing the segmentation"))
        job = self._writeJob(
            self.editSession.write_job, labelOfSegment, model=model, margin_mm=marginMm, steps=steps,
            scheduler=scheduler, seed=seed, strength=strength, samples=samples, device=device,
        )
        scanNode = self.editSession.scan_node
        return self._start(job, "edit", outputVolumeNode, scanNode.GetName() + " edited", scanNode)

    @staticmethod
    def _writeJob(write, *args, **kwargs):
        """A new job folder with the exported conditions; removed again if the export fails."""
        folder = jobs.new_job_folder()
        try:
            return write(folder, *args, **kwargs)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _start(self, job, task, outputVolumeNode, name, nextTo):
        if self.serverUrl():
            server = remote.Server.from_files(self.serverUrl(), self.serverTokenFile() or None)
            self._run = remote.RemoteRun(job, server)
        else:
            self._run = jobs.WorkerRun(job, python=self.workerPython())
        self._target = (outputVolumeNode, name, nextTo)
        self.activeTask = task
        return self._run

    def poll(self):
        if self._run is None:
            return []
        progress = self._run.poll()
        preview = self._run.preview
        if preview is not None and preview != self._shownPreview:
            firstPreview = self._previewNode is None
            self._previewNode = scene.show_preview(preview[0], slicer.mrmlScene, self._previewNode,
                                                   name=self._target[1])
            self._shownPreview = preview
            if firstPreview:
                scene.show_in_slice_views(self._previewNode)
        return progress

    def cancel(self) -> None:
        if self.isRunning():
            self._run.cancel()

    def finish(self):
        """Put a successful result into the scene: returns (node or None if cancelled, outcome)."""
        run, (outputVolumeNode, name, nextTo) = self._run, self._target
        outcome = run.wait()
        scene.remove_preview(self._previewNode)
        self._previewNode = self._shownPreview = None
        self.activeTask = None
        self._run = self._target = None
        node = scene.apply_outcome(
            outcome, slicer.mrmlScene, output_node=outputVolumeNode, name=name, next_to=nextTo
        )
        run.job.remove_data()  # failed runs raised above and keep their inputs for a rerun by hand
        if node is not None:
            scene.show_in_slice_views(node)
        return node, outcome

    def process(self, segmentationNode, labelOfSegment: dict, **options):
        """Synthesize and wait (Python console, self-test): returns the output volume node."""
        self.startSynthesis(segmentationNode, labelOfSegment, **options)
        node, _outcome = self.finish()
        return node


#
# VCMSynthesisTest
#


class VCMSynthesisTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: the model catalogue and the job export (no torch needed), then, where the
    worker Python has torch and MONAI, a small segmentation -> synthesis with the shipped demo
    model -> output volume on the reference geometry, and a Cancel that leaves the scene as it was.
    (An extension build machine has no torch: the synthesis part then says why it is skipped.)"""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_CatalogueAndExportWithoutTorch()
        environment = jobs.probe_worker_python(VCMSynthesisLogic().workerPython())
        if environment.missing:
            self.delayDisplay("Synthesis not tested: " + environment.summary())
            return
        self.setUp()
        self.test_SynthesisGeometry()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()

    def _smallCase(self):
        import numpy as np

        reference = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "reference")
        slicer.util.updateVolumeFromArray(reference, np.zeros((24, 28, 20), dtype=np.float32))
        ijkToRas = vtk.vtkMatrix4x4()
        for row, values in enumerate([[0.0, 1.2, 0.1, -20.0], [1.1, 0.0, 0.0, 5.0], [0.0, 0.2, 2.5, 3.0]]):
            for column, value in enumerate(values):
                ijkToRas.SetElement(row, column, value)
        reference.SetIJKToRASMatrix(ijkToRas)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "condition")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        labelmap = np.zeros((24, 28, 20), dtype=np.uint8)
        labelmap[4:20, 6:22, 4:16] = 1
        labelmap[8:16, 10:18, 6:14] = 2
        segmentIds = []
        for value in (1, 2):
            segmentId = segmentation.GetSegmentation().AddEmptySegment(f"segment {value}")
            slicer.util.updateSegmentBinaryLabelmapFromArray(
                (labelmap == value).astype(np.uint8), segmentation, segmentId, reference
            )
            segmentIds.append(segmentId)
        labels = [label["value"] for label in VCMSynthesisLogic().labelTable("demo") if label["value"] != 0]
        self.assertTrue(labels, "the shipped demo model is missing or has no labels")
        return reference, segmentation, {segmentIds[0]: labels[0], segmentIds[1]: labels[-1]}

    def test_CatalogueAndExportWithoutTorch(self):
        self.delayDisplay("Model list, label table and job export in Slicer's own Python")
        logic = VCMSynthesisLogic()
        self.assertIn("demo", [entry.name for entry in logic.models()])
        self.assertEqual(logic.modelConfig("demo").name, "demo")
        _reference, segmentation, mapping = self._smallCase()
        folder = jobs.new_job_folder()
        try:
            job = scene.write_synthesis_job(
                folder, segmentation, mapping, model="demo", steps=2, scheduler="ddim", seed=1
            )
            self.assertTrue(Path(job.arguments[job.arguments.index("--segmentation") + 1]).is_file())
            self.assertEqual(job.arguments[job.arguments.index("--scheduler") + 1], "ddim")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Test passed")

    @staticmethod
    def _nodeIds():
        scene_ = slicer.mrmlScene
        return [scene_.GetNthNode(index).GetID() for index in range(scene_.GetNumberOfNodes())]

    def test_SynthesisGeometry(self):
        self.delayDisplay("Synthesis onto an oblique, anisotropic reference")
        reference, segmentation, mapping = self._smallCase()
        logic = VCMSynthesisLogic()
        self.assertTrue(logic.workerHasDependencies(askToInstall=False), logic.lastEnvironmentSummary)
        output = logic.process(
            segmentation, mapping, model="demo", referenceVolumeNode=reference, steps=2, seed=1
        )
        self.assertIsNotNone(output)
        self.assertEqual(output.GetImageData().GetDimensions(), reference.GetImageData().GetDimensions())
        expected, actual = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        reference.GetIJKToRASMatrix(expected)
        output.GetIJKToRASMatrix(actual)
        for row in range(4):
            for column in range(4):
                self.assertAlmostEqual(
                    actual.GetElement(row, column), expected.GetElement(row, column), places=5
                )
        self.delayDisplay("Test passed")

    def test_CancelLeavesSceneUnchanged(self):
        self.delayDisplay("Cancel leaves the scene unchanged")
        reference, segmentation, mapping = self._smallCase()
        before = self._nodeIds()
        logic = VCMSynthesisLogic()
        logic.startSynthesis(segmentation, mapping, model="demo", referenceVolumeNode=reference, steps=1000)
        logic.cancel()
        node, outcome = logic.finish()
        self.assertIsNone(node)
        self.assertEqual(outcome.status, "cancelled")
        after = self._nodeIds()
        self.assertEqual(before, after)
        self.delayDisplay("Test passed")
