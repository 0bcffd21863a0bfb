"""What the three trainers share: config, data manifest, distributed set-up, the training loop.

The loop resumes exactly: everything random in a step is drawn from a generator seeded by
(seed, step, rank), and the checkpoint holds the model, optimizer, scheduler, EMA weights, step
and the global RNG states, so a run stopped and resumed logs the same losses as one that was not.
Data-parallel runs start under `torchrun --nproc_per_node=N` (DistributedDataParallel; gloo on
CPU, nccl on GPU); every rank draws its own samples, the gradients are averaged.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "VCMSynthesis"))

from VCMSynthesisLib.errors import UserError  # noqa: E402
from VCMSynthesisLib.files import atomic_path  # noqa: E402, F401  (the one write path; scripts use common.atomic_path)

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.csv"
INIT_FROM_NAME = "init_from.json"  # a run that began from another run's weights names it here

# Training settings every trainer understands; a config file overrides any of them.
DEFAULT_TRAINING = {
    "seed": 0,
    "steps": 1000,
    "batch_size": 1,
    "lr": 1e-4,
    "weight_decay": 0.0,
    "warmup_steps": 0,
    "min_lr_ratio": 0.0,
    "grad_clip": 1.0,
    "ema_decay": None,
    "checkpoint_every": 100,
    "checkpoint_minutes": 3.0,
    "log_every": 10,
    "max_minutes": None,
    "pause_at": None,
    "threads": None,
}


class ConfigLoader(yaml.SafeLoader):
    """YAML with YAML 1.2 floats: PyYAML reads `5e-4` (no dot) as a string, which is what people write."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$|^[-+]?(?:\d+\.\d*|\.\d+)$"),
    list("-+0123456789."))


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a YAML config and apply `key.sub=value` overrides (values parsed as YAML)."""
    try:
        config = yaml.load(Path(path).read_text(), Loader=ConfigLoader) or {}
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"cannot read config {path}: {error}; pass an existing YAML file") from error
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"override {item!r} is not key=value; write e.g. training.steps=200")
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.load(value, Loader=ConfigLoader)
    config["training"] = {**DEFAULT_TRAINING, **config.get("training", {})}
    for key, value in config["training"].items():
        if isinstance(DEFAULT_TRAINING.get(key), (int, float)) and not isinstance(value, (int, float)):
            raise UserError(f"training.{key} is {value!r}, not a number; write e.g. {key}: "
                            f"{DEFAULT_TRAINING[key]}")
    return config


@dataclass(frozen=True)
class Case:
    """One training case: an image and its condition files (any may be absent: None)."""

    name: str
    split: str
    files: dict[str, Path]


def read_manifest(path: str | os.PathLike, split: str | None = None) -> list[Case]:
    """Cases of a CSV manifest (`case`, optional `split`, one column per file; paths relative to it).

    A folder is accepted too: its `manifest.csv` is read.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.csv"
    if not path.is_file():
        raise UserError(f"manifest {path} not found; run training/prepare_demo_data.py or write one")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "case" not in rows[0]:
        raise UserError(f"manifest {path} needs a header with a 'case' column and at least one row")
    cases = []
    for row in rows:
        files = {key: path.parent / value for key, value in row.items()
                 if key not in ("case", "split") and value}
        missing = [str(file) for file in files.values() if not file.is_file()]
        if missing:
            raise UserError(f"manifest {path}: case {row['case']} lists missing files {missing}")
        cases.append(Case(row["case"], row.get("split") or "train", files))
    selected = [case for case in cases if split is None or case.split == split]
    if not selected:
        raise UserError(f"manifest {path} has no cases with split '{split}'")
    return selected


def read_array(path: Path) -> np.ndarray:
    """A volume as a float32 array indexed (x, y, z), as the model grid is (first axis first)."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0))


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The generator for everything random in one step of one rank: resume-exact by design."""
    generator = torch.Generator()
    generator.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))
    return generator


@dataclass(frozen=True)
class Distributed:
    """This process's place in a (possibly single-process) data-parallel run."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> Distributed:
    """Join the `torchrun` process group if there is one (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Distributed(rank, world_size, chosen)


@contextlib.contextmanager
def main_rank_first(context: Distributed):
    """Run the block on the main rank first (to fill a cache), then on the others (to read it)."""
    if context.world_size > 1 and not context.is_main:
        dist.barrier()
    yield
    if context.world_size > 1 and context.is_main:
        dist.barrier()


def cosine_with_warmup(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR factor: linear warm-up to 1, then cosine decay to `min_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _rng_states() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached)}


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2))


def write_csv(path: str | os.PathLike, rows: list[dict[str, str]], fields: list[str] | None = None) -> None:
    """Write `rows` as CSV with a header (`fields`, default the first row's keys), atomically."""
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _atomic_torch_save(state: dict[str, Any], path: Path) -> None:
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def save_safetensors(module: nn.Module, path: Path) -> None:
    """Save a module's weights (float32, contiguous) as safetensors, atomically."""
    state = {key: value.detach().float().contiguous().cpu() for key, value in module.state_dict().items()}
    with atomic_path(path) as temporary:
        save_file(state, str(temporary))


class RunLog:
    """CSV and TensorBoard logs of one run (main rank only); resuming drops rows past the checkpoint."""

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / LOG_NAME
        self.writer = None
        if not enabled:
            return
        kept: list[dict[str, str]] = []
        if self.path.is_file() and resume_step > 0:
            with open(self.path, newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
        self.rows = kept
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": str(step), **{key: f"{value:.8g}" for key, value in values.items()}}
        self.rows.append(row)
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        fields = list(dict.fromkeys(key for existing in self.rows for key in existing))
        write_csv(self.path, self.rows, fields)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_log(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a run's CSV log as numbers."""
    with open(Path(run_dir) / LOG_NAME, newline="") as handle:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]


LossFunction = Callable[[nn.Module, int, torch.Generator], tuple[torch.Tensor, dict[str, float]]]


def train(
    model: nn.Module,
    loss_function: LossFunction,
    settings: dict[str, Any],
    run_dir: str | os.PathLike,
    context: Distributed,
    description: str = "training",
) -> nn.Module:
    """Fit the trainable parameters of `model` and return it (EMA weights if `ema_decay` is set).

    `loss_function(module, step, generator)` draws its batch with `generator` and returns the
    loss and extra values to log; `module` is `model`, wrapped in DDP when data-parallel. The
    run directory holds `checkpoint.pt` (resumed automatically), `log.csv` and TensorBoard logs.
    Stops at `settings["steps"]`, or earlier (checkpointed; run again to go on) after `max_minutes`
    or on reaching step `pause_at`.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if settings.get("threads"):
        torch.set_num_threads(int(settings["threads"]))
    model.to(context.device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings["lr"], weight_decay=settings["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(settings["warmup_steps"], settings["steps"], settings["min_lr_ratio"]))
    ema = copy.deepcopy(model).eval().requires_grad_(False) if settings["ema_decay"] else None

    step = 0
    checkpoint_path = run_dir / CHECKPOINT_NAME
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=context.device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        _set_rng_states(state["rng"])
        step = int(state["step"])

    def save_checkpoint() -> None:
        if context.is_main:
            _atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "step": step, "rng": _rng_states(),
                                "ema": ema.state_dict() if ema is not None else {}}, checkpoint_path)

    wrapped = model
    if context.world_size > 1:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids)
    log = RunLog(run_dir, step, context.is_main)
    started = time.monotonic()
    last_checkpoint = started
    progress = tqdm(total=settings["steps"], initial=step, desc=description, disable=not context.is_main,
                    dynamic_ncols=True)
    model.train()
    while step < settings["steps"]:
        generator = step_generator(settings["seed"], step, context.rank)
        loss, extras = loss_function(wrapped, step, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(parameters, settings["grad_clip"])
        optimizer.step()
        scheduler.step()
        if ema is not None:
            with torch.no_grad():
                for averaged, current in zip(ema.parameters(), model.parameters(), strict=True):
                    averaged.lerp_(current, 1 - settings["ema_decay"])
                for averaged, current in zip(ema.buffers(), model.buffers(), strict=True):
                    averaged.copy_(current)
        step += 1
        progress.update(1)
        if step % settings["log_every"] == 0 or step == settings["steps"]:
            values = {"loss": loss.detach(), **{k: torch.as_tensor(v) for k, v in extras.items()}}
            if context.world_size > 1:
                stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in values.values()])
                stacked = stacked.to(context.device)
                dist.all_reduce(stacked)
                values = dict(zip(values, (stacked / context.world_size).tolist(), strict=True))
            values = {key: float(value) for key, value in values.items()}
            values["lr"] = scheduler.get_last_lr()[0]
            values["minutes"] = (time.monotonic() - started) / 60
            log.log(step, values)
            progress.set_postfix(loss=f"{values['loss']:.4f}")
        now = time.monotonic()
        out_of_time = settings["max_minutes"] is not None and now - started > 60 * settings["max_minutes"]
        out_of_time = out_of_time or step == settings["pause_at"]
        if context.world_size > 1:
            flag = torch.tensor([float(out_of_time)], device=context.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        due = (step % settings["checkpoint_every"] == 0
               or now - last_checkpoint > 60 * settings["checkpoint_minutes"])
        if context.world_size > 1:
            flag = torch.tensor([float(due)], device=context.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            due = bool(flag.item())
        if due or out_of_time or step == settings["steps"]:
            save_checkpoint()
            last_checkpoint = now
        if out_of_time:
            break
    progress.close()
    log.close()
    if context.world_size > 1:
        dist.barrier()
    model.eval()
    return ema if ema is not None else model


def checkpoint_step(run_dir: str | os.PathLike) -> int | None:
    """The step the run's checkpoint holds (None without one)."""
    path = Path(run_dir) / CHECKPOINT_NAME
    return int(torch.load(path, weights_only=True)["step"]) if path.is_file() else None


def finished(run_dir: str | os.PathLike, settings: dict[str, Any]) -> bool:
    """True if the run's checkpoint has reached the configured number of steps."""
    step = checkpoint_step(run_dir)
    return step is not None and step >= settings["steps"]


def evaluation_arguments(description: str, default_model: str) -> argparse.ArgumentParser:
    """The options both evaluation scripts share; callers add their own and parse."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=default_model, help="model name or folder")
    parser.add_argument("--manifest", type=Path, default=Path("training/data/heldout/recipe/manifest.csv"),
                        help="held-out cases (default: those drawn with the first demo's recipe)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--cases", type=int, default=8, help="at most this many cases")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write every case's figures and the medians here (JSON)")
    parser.add_argument("--threads", type=int, help="torch threads (1 is fastest on busy shared cores)")
    return parser


def trainer_arguments(description: str, argv: list[str] | None = None) -> tuple[dict[str, Any], Path]:
    """The command line all trainers share: `--config`, `--run-dir`, repeated `--set key=value`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config (see training/configs/)")
    parser.add_argument("--run-dir", required=True, type=Path,
                        help="checkpoint, logs and weights; an existing checkpoint there is resumed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set training.steps=200")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides), args.run_dir


def random_flip(tensors: list[torch.Tensor], generator: torch.Generator, axis: int = 2) -> list[torch.Tensor]:
    """Flip all tensors together along `axis` (default: the first spatial axis, left-right) half the time."""
    if torch.rand((), generator=generator) < 0.5:
        return [tensor.flip(axis) for tensor in tensors]
    return tensors


def encode_latents(autoencoder: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Latent means `(N, C, ...)` of images `(N, 1, ...)`, one at a time (the mean, not a sample)."""
    autoencoder.to(device).eval()
    with torch.no_grad():
        return torch.cat([autoencoder.encode(image[None].to(device))[0].cpu() for image in tqdm(
            images, desc="encoding", leave=False)])


def load_autoencoder(run_dir: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The autoencoder a `train_autoencoder.py` run wrote, and its keyword arguments."""
    import json

    from monai.networks.nets import AutoencoderKL
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if not (run_dir / "autoencoder.safetensors").is_file():
        raise UserError(f"{run_dir} holds no autoencoder.safetensors; train it first "
                        f"(training/train_autoencoder.py)")
    params = json.loads((run_dir / "autoencoder.json").read_text())
    model = AutoencoderKL(**params)
    model.load_state_dict(load_file(str(run_dir / "autoencoder.safetensors")))
    return model.eval().requires_grad_(False), params
