"""The run directory: config, metrics, atomic checkpoints with exact resume, and the exported backbone.

    runs/<name>/config.yaml              every resolved option, the recipe, package versions
    runs/<name>/metrics.jsonl            one JSON record per log step (TensorBoard events beside it)
    runs/<name>/checkpoints/step-XXXXXXXX/   Accelerate state + input-stack state and the method's
                                         per-rank buffers (e.g. SwAV's queue), one file per rank + meta.json
                                         and the method's own optimizers (method_state.pt)
    runs/<name>/backbone.safetensors     the backbone's weights (timm names) + backbone.json

A checkpoint is written into a temporary directory and renamed when every rank has finished, so a
crash or a full disk never leaves a half-written checkpoint in place of the last good one.
Everything is loaded with `weights_only=True`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from importlib import metadata
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError

from pipelines.files import atomic_write, atomic_write_text

CHECKPOINTS = "checkpoints"
PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message is one line naming the path and the fix."""


def _stack_file(rank: int) -> str:
    return f"input_stack_rank{rank}.pt"


def _per_rank_file(rank: int) -> str:
    return f"method_rank{rank}.pt"


METHOD_STATE = "method_state.pt"  # the method's `checkpoint_state` (its own optimizers), from the main process


def package_versions() -> dict[str, str]:
    names = ["torch", "nvidia-dali-cuda120", "kornia", "timm", "accelerate", "webdataset"]
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def list_checkpoints(run_root: Path) -> list[Path]:
    folder = run_root / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def config_differences(saved: dict, current: dict, ignore) -> list[str]:
    keys = sorted((set(saved) | set(current)) - set(ignore))
    return [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in keys if saved.get(key) != current.get(key)]


class MetricsLogger:
    """Appends records to metrics.jsonl and TensorBoard (main process only)."""

    def __init__(self, root: Path, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = root / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(root / "tensorboard"), purge_step=resume_step)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and value is not None:
                self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class RunCheckpoints:
    def __init__(self, root: Path, keep: int, ignore_on_resume):
        self.root = root
        self.keep = keep
        self.ignore_on_resume = ignore_on_resume
        self.checkpoint_dir = root / CHECKPOINTS
        self.resumed_step: int | None = None

    @classmethod
    def for_run(cls, config, accelerator) -> RunCheckpoints:
        """The run directory: the resumed run's, or output_dir/name (a timestamped name by default)."""
        from accelerate.utils import broadcast_object_list

        if config.resume and config.resume != "auto":
            found = _checkpoint_path(Path(config.resume))
            root = found.parent.parent
        else:
            name = config.name
            if name is None and config.resume == "auto":
                name = _latest_run_name(Path(config.output_dir), config.method)
            if name is None:
                name = [f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}"]
                broadcast_object_list(name)  # every rank writes into the main process's directory
                name = name[0]
            root = Path(config.output_dir) / name
        if accelerator.is_main_process:
            (root / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        return cls(root, config.keep_checkpoints, type(config).RESUMABLE_DIFFERENCES)

    def write_config(self, config, recipe, runtime: dict | None = None) -> None:
        document = {"config": dataclasses.asdict(config), "recipe": recipe.to_dict(),
                    "recipe_text": recipe.describe(), "runtime": runtime or {}, "versions": package_versions()}
        atomic_write_text(self.root / "config.yaml", yaml.safe_dump(document, sort_keys=False))

    def logger(self, accelerator) -> MetricsLogger:
        return MetricsLogger(self.root, accelerator.is_main_process, self.resumed_step)

    def save(self, step: int, config, accelerator, stack, model) -> Path:
        final = self.checkpoint_dir / f"{PREFIX}{step:08d}"
        temporary = self.checkpoint_dir / f".tmp-{PREFIX}{step:08d}"
        try:
            if accelerator.is_main_process and temporary.exists():
                shutil.rmtree(temporary)
            accelerator.wait_for_everyone()
            accelerator.save_state(output_dir=str(temporary))
            torch.save(stack.state_dict(), temporary / _stack_file(accelerator.process_index))
            per_rank = model.per_rank_state()
            if per_rank:  # Accelerate saves the model from the main process only
                torch.save(per_rank, temporary / _per_rank_file(accelerator.process_index))
            own = model.checkpoint_state()  # replicated: the main process's copy serves every rank
            if own and accelerator.is_main_process:
                torch.save(own, temporary / METHOD_STATE)
            if accelerator.is_main_process:
                meta = {"step": step, "num_processes": accelerator.num_processes,
                        "device": accelerator.device.type, "config": dataclasses.asdict(config)}
                (temporary / "meta.json").write_text(json.dumps(meta, indent=2))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                if final.exists():
                    shutil.rmtree(final)
                os.replace(temporary, final)
                for old in list_checkpoints(self.root)[: -self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        except (OSError, RuntimeError, SafetensorError) as error:  # a full disk in torch.save / safetensors
            free = shutil.disk_usage(self.checkpoint_dir).free // 2**20  # before the clean-up frees space
            if accelerator.is_main_process:
                shutil.rmtree(temporary, ignore_errors=True)
            reason = getattr(error, "strerror", None) or (str(error).strip().splitlines() or [repr(error)])[0]
            raise CheckpointError(
                f"cannot write checkpoint {final} ({reason}; {free} MiB were free); the previous checkpoint "
                f"is kept: free space in {self.checkpoint_dir} or lower --keep-checkpoints"
            ) from None
        accelerator.wait_for_everyone()
        return final

    def resume(self, spec: str, config, accelerator, stack, model) -> int:
        """Load the checkpoint `spec` names ("auto": this run's latest); returns the step to continue from."""
        if spec == "auto":
            found = list_checkpoints(self.root)
            if not found:
                accelerator.print(f"--resume auto: no checkpoint in {self.checkpoint_dir}, starting fresh")
                return 0
            path = found[-1]
        else:
            path = _checkpoint_path(Path(spec))
        meta = json.loads((path / "meta.json").read_text())
        differences = config_differences(meta["config"], dataclasses.asdict(config), self.ignore_on_resume)
        if meta["num_processes"] != accelerator.num_processes:
            differences.append(f"processes: {meta['num_processes']} -> {accelerator.num_processes}")
        if differences:
            raise CheckpointError(f"--resume {path}: the run was started with other options ({'; '.join(differences)})"
                                  ": resume with the same options or start a new run")
        saved_device = meta.get("device", accelerator.device.type)
        if saved_device != accelerator.device.type:
            # the input stack's random generator (and more) is device-specific: it would fail half-way
            raise CheckpointError(f"--resume {path}: the checkpoint was written on {saved_device}, this run is "
                                  f"on {accelerator.device.type}: resume on a machine with the same kind of "
                                  f"device, or start a new run from the exported backbone")
        accelerator.load_state(str(path))
        state = torch.load(path / _stack_file(accelerator.process_index), weights_only=True)
        stack.load_state_dict(state)
        per_rank = path / _per_rank_file(accelerator.process_index)
        if model.PER_RANK_BUFFERS:
            if not per_rank.is_file():
                raise CheckpointError(f"--resume {path}: {per_rank.name} is missing (the method keeps state per "
                                      f"process): resume from a complete checkpoint")
            model.load_per_rank_state(torch.load(per_rank, weights_only=True, map_location="cpu"))
        if model.checkpoint_state():
            if not (path / METHOD_STATE).is_file():
                raise CheckpointError(f"--resume {path}: {METHOD_STATE} is missing (the method keeps optimizers of "
                                      f"its own): resume from a complete checkpoint")
            model.load_checkpoint_state(torch.load(path / METHOD_STATE, weights_only=True, map_location="cpu"))
        self.resumed_step = meta["step"]
        accelerator.print(f"resumed from {path} at step {meta['step']}")
        return meta["step"]

    def export_backbone(self, backbone: torch.nn.Module, config, model_kwargs: dict | None = None,
                        input_size: int | None = None, **extra) -> Path:
        """`export_backbone` into the run directory (`extra`: e.g. "input": "lightness" for a backbone that
        trained on lightness, which the evaluation tools then feed it)."""
        return export_backbone(self.root, backbone, timm_name=config.backbone, method=config.method,
                               model_kwargs=model_kwargs, input_size=input_size, **extra)


def _checkpoint_path(path: Path) -> Path:
    """A step directory, or a run directory (its latest checkpoint)."""
    if (path / "meta.json").is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise CheckpointError(f"--resume {path}: not a checkpoint or a run directory with checkpoints")


def _latest_run_name(output_dir: Path, method: str) -> str | None:
    runs = [p for p in output_dir.glob(f"{method}-*") if list_checkpoints(p)] if output_dir.is_dir() else []
    return max(runs, key=lambda p: list_checkpoints(p)[-1].stat().st_mtime).name if runs else None


BACKBONE_WEIGHTS, BACKBONE_INFO = "backbone.safetensors", "backbone.json"


def export_backbone(folder: Path, backbone: torch.nn.Module, *, timm_name: str, method: str | None,
                    model_kwargs: dict | None = None, input_size: int | None = None, **extra) -> Path:
    """Writes `folder`/backbone.safetensors (the weights under timm's names) and then backbone.json: the
    timm name, the method, the weights' file name, the stem (`backbone.stem`), the `timm.create_model`
    keyword arguments and the input size it was trained at (the first crop size), then `extra` keys.
    Each file is written atomically; returns the weights' path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / BACKBONE_WEIGHTS
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in backbone.state_dict().items()}
    atomic_write(path, lambda temporary: save_file(state, str(temporary)))
    info = {"timm_name": timm_name, "method": method, "file": path.name,
            "stem": getattr(backbone, "stem", "standard"), "model_kwargs": model_kwargs or {},
            "input_size": input_size, **extra}
    atomic_write_text(folder / BACKBONE_INFO, json.dumps(info, indent=2))
    return path
