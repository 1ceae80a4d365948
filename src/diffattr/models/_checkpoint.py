"""Checkpoints: safetensors weights plus one JSON file that describes everything else.

Layout of a checkpoint directory::

    checkpoint.json                 model spec, scheduler, training recipe, seeds, dataset, split,
                                    step, and the name and SHA-256 of every weight file
    model-<step>.safetensors        the trained weights
    ema-<step>.safetensors          exponential moving average of the weights (optional)
    optimizer-<step>.safetensors    optimizer tensors, for resuming (optional)

Weight files carry the step in their names and ``checkpoint.json`` is replaced last, atomically,
so an interrupted save leaves the previous checkpoint intact and loadable.

Checkpoints are shared, so ``checkpoint.json`` is treated as untrusted data: the weight files it
lists must lie inside the directory, and a model built by an importable ``module:factory`` (code
from outside diffattr) loads only with ``trust_remote_code=True`` (see ``docs/trust.md``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from diffattr._io import atomic_write, path_inside, read_format, read_json, sha256_file, write_json
from diffattr._version import __version__
from diffattr.data import ImageDataset, load_from_source
from diffattr.errors import CheckpointError, DataError
from diffattr.models._registry import ModelSpec, build_model, imports_code, load_weights

CHECKPOINT_FILE = "checkpoint.json"
FORMAT = "diffattr.checkpoint"
FORMAT_VERSION = 1

WeightsChoice = Literal["auto", "ema", "raw"]


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint's metadata; weights are read on demand.

    Attributes:
        path: The checkpoint directory.
        model_spec: How to rebuild the model.
        scheduler_config: The diffusers noise-scheduler config (with ``_class_name``).
        step: Optimisation steps taken.
        metadata: Everything else in ``checkpoint.json``: ``training`` recipe, ``dataset``,
            ``split``, seeds; empty dicts when the model was not trained by diffattr.
        files: Role (``model``, ``ema``, ``optimizer``) -> file name inside ``path``.
    """

    path: Path
    model_spec: ModelSpec
    scheduler_config: dict[str, Any]
    step: int
    metadata: dict[str, Any]
    files: dict[str, str]

    @property
    def has_ema(self) -> bool:
        """Whether EMA weights were saved."""
        return "ema" in self.files

    def load_state(self, role: str) -> dict[str, torch.Tensor]:
        """Read one weight file (``model``, ``ema`` or ``optimizer``) as a tensor dict."""
        if role not in self.files:
            raise CheckpointError(f"{self.path}: checkpoint has no {role!r} weights")
        file = path_inside(self.path, self.files[role], CHECKPOINT_FILE, CheckpointError)
        try:
            return load_file(file)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file}: unreadable weights ({err})") from err

    def load_model(self, weights: WeightsChoice = "auto", device: str = "cpu") -> nn.Module:
        """Rebuild the model and load its weights, in eval mode.

        Args:
            weights: ``"ema"`` or ``"raw"`` (the optimised weights); ``"auto"`` takes the EMA
                weights when the checkpoint has them, the usual choice for sampling and attribution.
            device: Where to put the model.

        Raises:
            CheckpointError: The requested weights are missing or do not fit the model.
        """
        role = self.weights_role(weights)
        # Initialisation draws (LoRA adapters' included) are overwritten by the weights: keep
        # them off the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            model = build_model(self.model_spec)
        load_weights(model, self.load_state(role), f"{self.path}: {role} weights")
        return model.to(device).eval()

    def load_scheduler(
        self, kind: Literal["ddpm", "ddim"] = "ddpm"
    ) -> DDPMScheduler | DDIMScheduler:
        """Build the noise scheduler the model was trained with, as a DDPM or DDIM sampler."""
        return scheduler_from_config(self.scheduler_config, kind)

    def weights_id(self, weights: WeightsChoice = "auto") -> str:
        """Return the SHA-256 of the weights :meth:`load_model` would load.

        It identifies the model in feature stores, so features of other weights are never mixed.
        """
        return str(self.describe()["files"][self.weights_role(weights)]["sha256"])

    def weights_role(self, weights: WeightsChoice = "auto") -> str:
        """The weight file (``ema`` or ``model``) that ``weights`` names for this checkpoint."""
        if weights == "auto":
            return "ema" if self.has_ema else "model"
        return "model" if weights == "raw" else weights

    def describe(self) -> dict[str, Any]:
        """Return the full ``checkpoint.json`` content."""
        return read_json(self.path / CHECKPOINT_FILE)

    def training_data(self) -> ImageDataset:
        """Reload the images the model was trained on, from the source its metadata records.

        Raises:
            DataError: The checkpoint records no reloadable dataset (e.g. in-memory images), or
                the reloaded images differ from the recorded fingerprint.
        """
        record = self.metadata.get("dataset") or {}
        source = record.get("source")
        if not source or source.get("kind") == "memory":
            raise DataError(f"{self.path} does not record a reloadable training dataset")
        data = load_from_source(source)
        expected = record.get("fingerprint")
        if expected is not None and data.fingerprint() != expected:
            raise DataError(
                f"{self.path}: the training data at its recorded source has changed since training "
                "(fingerprints differ)"
            )
        return data

    def heldout_data(self) -> ImageDataset:
        """Reload the held-out images of the split the model was trained with.

        Raises:
            DataError: The checkpoint records no split or no reloadable dataset.
        """
        split = self.metadata.get("split")
        source = (self.metadata.get("dataset") or {}).get("source")
        if not split or not source or source.get("kind") == "memory":
            raise DataError(f"{self.path} records no reloadable held-out split")
        whole = load_from_source({k: v for k, v in source.items() if k != "ids"})
        return whole.select(split["query_ids"])


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model_spec: ModelSpec,
    scheduler_config: dict[str, Any],
    step: int,
    states: dict[str, dict[str, torch.Tensor]],
    metadata: dict[str, Any] | None = None,
) -> Checkpoint:
    """Write a checkpoint atomically and delete the files of the one it replaces.

    Only files inside ``path`` are deleted: a name the previous ``checkpoint.json`` lists outside
    it (``..``, an absolute path, a symbolic link out) is left alone.

    Args:
        path: The checkpoint directory (created if missing).
        model_spec: How to rebuild the model.
        scheduler_config: The noise scheduler's config, e.g. ``json.loads(s.to_json_string())``.
        step: Optimisation steps taken.
        states: Role -> tensor dict; must contain ``"model"``, may contain ``"ema"`` and
            ``"optimizer"``.
        metadata: JSON-serialisable extras (training recipe, dataset, split, seeds).

    Returns:
        The written checkpoint.
    """
    if "model" not in states:
        raise CheckpointError("a checkpoint needs 'model' weights")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    previous = _referenced_files(path)
    files: dict[str, dict[str, str]] = {}
    for role, state in sorted(states.items()):
        name = f"{role}-{step:08d}.safetensors"
        tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
        atomic_write(path / name, lambda tmp, t=tensors: save_file(t, tmp))
        files[role] = {"file": name, "sha256": sha256_file(path / name)}
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "diffattr_version": __version__,
        "model": model_spec.to_dict(),
        "scheduler": dict(scheduler_config),
        "step": int(step),
        "files": files,
        **(metadata or {}),
    }
    write_json(path / CHECKPOINT_FILE, doc)
    # Resolved, so that another spelling of a file just written is not taken for a stale one.
    for stale in previous - {(path / entry["file"]).resolve() for entry in files.values()}:
        stale.unlink(missing_ok=True)
    # The caller chose model_spec: building it again needs no further consent.
    return load_checkpoint(path, verify=False, trust_remote_code=True)


def load_checkpoint(
    path: str | os.PathLike[str], *, verify: bool = True, trust_remote_code: bool = False
) -> Checkpoint:
    """Open a checkpoint directory.

    Args:
        path: The directory holding ``checkpoint.json``.
        verify: Check every weight file against its recorded SHA-256.
        trust_remote_code: Allow a model built by an importable ``"module:factory"``: building
            it imports that module and calls the factory, which runs whatever code they hold.
            Pass True only for checkpoints whose author you trust; registry models
            (``diffattr models``) need no trust.

    Raises:
        CheckpointError: The directory or a file is missing, ``checkpoint.json`` is malformed or of
            another format, lists a weight file outside the directory, names an importable
            factory without ``trust_remote_code``, or a weight file does not match its
            recorded hash.
    """
    path = Path(path)
    doc_path = path / CHECKPOINT_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not doc_path.is_file():
        raise CheckpointError(f"{path}: not a diffattr checkpoint (no {CHECKPOINT_FILE})")
    doc = read_format(doc_path, FORMAT, FORMAT_VERSION, CheckpointError)
    try:
        files = {role: str(entry["file"]) for role, entry in doc["files"].items()}
        hashes = {role: str(entry["sha256"]) for role, entry in doc["files"].items()}
        checkpoint = Checkpoint(
            path=path,
            model_spec=ModelSpec.from_dict(doc["model"]),
            scheduler_config=dict(doc["scheduler"]),
            step=int(doc["step"]),
            metadata={k: v for k, v in doc.items() if k not in _CORE_KEYS},
            files=files,
        )
    except (KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{doc_path}: malformed checkpoint description ({err!r})") from err
    if "model" not in files:
        raise CheckpointError(f"{doc_path}: lists no 'model' weights")
    factory = checkpoint.model_spec.name
    if imports_code(factory) and not trust_remote_code:
        raise CheckpointError(
            f"{path}: its model is built by {factory!r}, code imported from outside diffattr; load "
            "it only if you trust its author, with trust_remote_code=True (--trust-remote-code)"
        )
    for role, name in files.items():
        file = path_inside(path, name, CHECKPOINT_FILE, CheckpointError)
        if not file.is_file():
            raise CheckpointError(f"{file}: {role} weights listed in {CHECKPOINT_FILE} are missing")
        if verify and sha256_file(file) != hashes[role]:
            raise CheckpointError(f"{file}: contents do not match the SHA-256 in {CHECKPOINT_FILE}")
    return checkpoint


_CORE_KEYS = {"format", "format_version", "model", "scheduler", "step", "files"}


def scheduler_from_config(
    config: dict[str, Any], kind: Literal["ddpm", "ddim"] = "ddpm"
) -> DDPMScheduler | DDIMScheduler:
    """A diffusers noise-scheduler config as a DDPM or DDIM sampler."""
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    return cls.from_config(config)


def refuse_other_run(previous: Checkpoint, current: dict[str, Any], stored: dict[str, Any]) -> None:
    """Refuse to resume ``previous`` when a part of its run differs from this one's.

    Args:
        previous: The checkpoint found in the output directory.
        current: Part name -> JSON value, for the run asked for.
        stored: The same parts as ``previous`` recorded them.

    Raises:
        CheckpointError: Naming the parts that differ.
    """
    differing = [
        key
        for key in current
        if json.dumps(current[key], sort_keys=True) != json.dumps(stored.get(key), sort_keys=True)
    ]
    if differing:
        raise CheckpointError(
            f"{previous.path} holds a different run (its {', '.join(differing)} differ); "
            "choose another output directory or pass overwrite"
        )


def _referenced_files(path: Path) -> set[Path]:
    """The weight files inside ``path`` that its current ``checkpoint.json`` lists, resolved."""
    try:
        names = [entry["file"] for entry in read_json(path / CHECKPOINT_FILE)["files"].values()]
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    files = set()
    for name in names:
        try:
            files.add(path_inside(path, name, CHECKPOINT_FILE, CheckpointError).resolve())
        except CheckpointError:
            continue  # never one of this checkpoint's files: it is left alone, not deleted
    return files
