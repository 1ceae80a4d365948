"""Saved diffusers pipelines as attribution checkpoints, with their optional LoRA fine-tunes.

A folder written by ``DDPMPipeline``/``DDIMPipeline`` or ``StableDiffusionPipeline``
``.save_pretrained`` (``model_index.json`` plus one folder per component) opens with
:func:`load_pipeline` as a :class:`Pipeline`, which :func:`~diffattr.methods.attribute` takes
wherever it takes a :class:`~diffattr.models.Checkpoint`:

- a DDPM/DDIM pipeline loads as its pixel-space ``UNet2DModel``;
- a Stable-Diffusion pipeline loads as a latent :class:`~diffattr.models.TextToImageUNet`: its
  UNet, its CLIP text encoder (frozen, see :class:`FrozenTextEncoder`) and its frozen VAE.

A LoRA adapter in the diffusers format (``pytorch_lora_weights.safetensors``) is loaded into the
UNet, whose base weights are then frozen: attribution over "every trainable parameter" is
attribution over the adapter, the Stable-Diffusion protocol of D-TRAK and DAS.
:func:`save_lora_weights` writes that format from a model fine-tuned with
:func:`~diffattr.models.add_lora`, for diffusers' ``load_lora_weights``.

Everything is read from local files: nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    ModelMixin,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_unet_state_dict_to_peft
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from diffattr._io import atomic_write, path_inside, read_json, sha256_file
from diffattr.errors import CheckpointError, ConfigError
from diffattr.models._checkpoint import WeightsChoice, scheduler_from_config
from diffattr.models._conditional import TextToImageUNet
from diffattr.models._lora import lora_parameter_names

PipelineKind = Literal["ddpm", "stable-diffusion"]

#: ``model_index.json`` ``_class_name`` -> how diffattr loads the pipeline.
SUPPORTED_PIPELINES: dict[str, PipelineKind] = {
    "DDPMPipeline": "ddpm",
    "DDIMPipeline": "ddpm",
    "StableDiffusionPipeline": "stable-diffusion",
}

#: The file diffusers' ``save_lora_weights`` writes and ``load_lora_weights`` looks for.
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"

#: Components each kind loads: name -> (library, accepted classes). The scheduler is read as a
#: config only, whatever its class.
_COMPONENTS: dict[PipelineKind, dict[str, tuple[str, tuple[str, ...]]]] = {
    "ddpm": {"unet": ("diffusers", ("UNet2DModel",))},
    "stable-diffusion": {
        "unet": ("diffusers", ("UNet2DConditionModel",)),
        "vae": ("diffusers", ("AutoencoderKL",)),
        "text_encoder": ("transformers", ("CLIPTextModel",)),
        "tokenizer": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
    },
}

#: Safetensors weights of a component, by library (sharded ones have a ``.index.json``).
_WEIGHTS_FILE = {
    "diffusers": "diffusion_pytorch_model.safetensors",
    "transformers": "model.safetensors",
}

_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


class FrozenTextEncoder(nn.Module):
    """A pipeline's CLIP text encoder as a frozen prompt encoder of :class:`TextToImageUNet`.

    :meth:`condition` returns the text model's last hidden states and :meth:`forward` passes
    them through, so the text model runs once per batch outside the gradient computation: it
    never runs under the gradient engine's vmap or layer hooks, and gets no gradients.

    Args:
        text_model: The pipeline's ``CLIPTextModel``; frozen in place.
        tokenizer: Its ``CLIPTokenizer``.
    """

    def __init__(self, text_model: CLIPTextModel, tokenizer: CLIPTokenizer) -> None:
        super().__init__()
        self.text_model = text_model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        # A tokenizer saved without model_max_length reports a huge one; the model's positions
        # are the real limit (77 for Stable Diffusion, where the two agree).
        self.max_length = min(
            int(tokenizer.model_max_length), int(text_model.config.max_position_embeddings)
        )

    def condition(self, prompts: Sequence[str]) -> torch.Tensor:
        """Hidden states (N, max_length, hidden_size) of ``prompts``, on the encoder's device."""
        weight = self.text_model.get_input_embeddings().weight
        if not prompts:
            return weight.new_empty((0, self.max_length, weight.shape[1]))
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            return self.text_model(tokens.input_ids.to(weight.device))[0]

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's ``encoder_hidden_states``: ``cond`` itself (computed by :meth:`condition`)."""
        return cond


@dataclass(frozen=True)
class Pipeline:
    """A saved diffusers pipeline; weights are read on demand.

    It offers what attribution needs of a :class:`~diffattr.models.Checkpoint`: ``path``,
    ``scheduler_config``, ``metadata``, :meth:`weights_id` and :meth:`load_model`.

    Attributes:
        path: The pipeline folder (holding ``model_index.json``).
        kind: ``"ddpm"`` (a pixel-space ``UNet2DModel``) or ``"stable-diffusion"``.
        scheduler_config: The pipeline's noise schedule as a ``DDPMScheduler`` config.
        files: Paths, relative to ``path``, of every file the model is built from.
        lora: The LoRA adapter loaded into the UNet, or None.
        metadata: Always empty: a pipeline records no diffattr training recipe.
    """

    path: Path
    kind: PipelineKind
    scheduler_config: dict[str, Any]
    files: tuple[str, ...]
    lora: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def load_model(self, weights: WeightsChoice = "auto", device: str = "cpu") -> nn.Module:
        """Build the model from the pipeline's files, in eval mode.

        Args:
            weights: ``"auto"`` or ``"raw"``: a pipeline holds one set of weights.
            device: Where to put the model.

        Returns:
            The ``UNet2DModel`` of a DDPM pipeline; a :class:`TextToImageUNet` (UNet, frozen text
            encoder, frozen VAE) of a Stable-Diffusion pipeline, whose only trainable
            parameters are the LoRA adapter's when there is one.

        Raises:
            CheckpointError: ``weights="ema"``, or a component's files cannot be loaded.
            ConfigError: The LoRA adapter does not fit the UNet.
        """
        self._check_weights(weights)
        # Initialisation draws (the adapter's included) are overwritten by the weights: keep
        # them off the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            model = self._build()
        return model.to(device).eval()

    def load_scheduler(
        self, kind: Literal["ddpm", "ddim"] = "ddpm"
    ) -> DDPMScheduler | DDIMScheduler:
        """Build the pipeline's noise schedule as a DDPM or DDIM sampler."""
        return scheduler_from_config(self.scheduler_config, kind)

    def weights_id(self, weights: WeightsChoice = "auto") -> str:
        """Return a SHA-256 over the model's files (and the LoRA adapter's), computed once.

        Configs count as well as weights: a VAE's ``scaling_factor`` or a tokenizer changes the
        features as surely as a weight does.
        """
        self._check_weights(weights)
        return self._digest

    @cached_property
    def _digest(self) -> str:
        entries = [(name, self.path / name) for name in self.files]
        if self.lora is not None:
            # Named by role, not location: moving the adapter file changes nothing.
            entries.append(("lora", self.lora))
        digest = hashlib.sha256()
        for name, file in sorted(entries):
            digest.update(f"{name}\0{sha256_file(file)}\n".encode())
        return digest.hexdigest()

    def _check_weights(self, weights: str) -> None:
        if weights not in ("auto", "raw"):
            raise CheckpointError(f"{self.path}: a pipeline has no {weights!r} weights")

    def _build(self) -> nn.Module:
        if self.kind == "ddpm":
            return _pretrained(UNet2DModel, self.path / "unet")
        unet = _pretrained(UNet2DConditionModel, self.path / "unet")
        if self.lora is not None:
            _load_adapter(unet, self.lora)
        vae = _pretrained(AutoencoderKL, self.path / "vae")
        text_model = _pretrained(CLIPTextModel, self.path / "text_encoder")
        try:
            tokenizer = CLIPTokenizer.from_pretrained(
                self.path / "tokenizer", local_files_only=True
            )
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{self.path / 'tokenizer'}: cannot load it ({err})") from err
        # The image side and channels follow from the UNet and the VAE (TextToImageUNet).
        return TextToImageUNet(
            unet,
            FrozenTextEncoder(text_model, tokenizer),
            vae,
            latent_scale=float(vae.config.scaling_factor),
        )


def load_pipeline(
    path: str | os.PathLike[str], *, lora: str | os.PathLike[str] | None = None
) -> Pipeline:
    """Open a saved diffusers pipeline, checking its files; models are built by ``load_model``.

    Args:
        path: The folder ``save_pretrained`` wrote (with ``model_index.json``).
        lora: A LoRA adapter for the UNet: a ``.safetensors`` file in the diffusers format, or a
            folder holding ``pytorch_lora_weights.safetensors``. None takes that file from the
            pipeline folder when it is there.

    Raises:
        CheckpointError: ``model_index.json`` is missing, malformed or names an unsupported
            pipeline, or a component's entry, folder, config or safetensors weights are missing.
        ConfigError: A LoRA adapter for a DDPM pipeline, or one that does not fit the UNet.
    """
    path = Path(path)
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(f"{path}: not a diffusers pipeline (no model_index.json)")
    try:
        index = read_json(index_path)
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    kind = SUPPORTED_PIPELINES.get(str(index.get("_class_name")))
    if kind is None:
        raise CheckpointError(
            f"{index_path}: pipeline class {index.get('_class_name')!r} is not supported; "
            f"diffattr loads {sorted(SUPPORTED_PIPELINES)}"
        )
    files: list[Path] = []
    for name, (library, classes) in _COMPONENTS[kind].items():
        folder = _component_folder(path, index, name, classes)
        files += _tokenizer_files(folder) if name == "tokenizer" else _model_files(folder, library)
    scheduler_folder = _component_folder(path, index, "scheduler", None)
    scheduler_config = _scheduler_config(scheduler_folder / "scheduler_config.json")
    adapter = _adapter_path(path, lora)
    if adapter is not None:
        if kind != "stable-diffusion":
            raise ConfigError(
                f"LoRA adapter {adapter}: diffattr loads adapters into Stable-Diffusion UNets "
                f"only, and {path} is a {index['_class_name']}"
            )
        _check_adapter(_meta_unet(path / "unet"), _read_adapter(adapter)[0], adapter)
    return Pipeline(
        path=path,
        kind=kind,
        scheduler_config=scheduler_config,
        files=tuple(sorted(file.relative_to(path).as_posix() for file in files)),
        lora=adapter,
    )


def save_lora_weights(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write the LoRA adapter of a UNet as diffusers' ``pytorch_lora_weights.safetensors``.

    The file loads with ``StableDiffusionPipeline.load_lora_weights`` (and :func:`load_pipeline`),
    and records the adapter's rank and alpha, so its scale survives the round trip.

    Args:
        model: A UNet with the adapter :func:`~diffattr.models.add_lora` injected (or a model
            with such a ``unet``, e.g. a :class:`TextToImageUNet`).
        directory: Where to write the file (created if missing); an existing one is replaced
            atomically.

    Returns:
        The written file.

    Raises:
        ConfigError: The UNet has no LoRA adapter.
    """
    unet = getattr(model, "unet", model)
    config = getattr(unet, "peft_config", {}).get("default")
    state = get_peft_model_state_dict(unet) if config is not None else {}
    if not state:
        raise ConfigError(f"{type(unet).__name__} has no LoRA adapter to save")
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    file = Path(directory) / LORA_WEIGHTS_FILE

    def write(tmp: Path) -> None:
        # diffusers' own writer, pointed at the temporary file: its key prefixes and metadata.
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            tmp.parent,
            unet_lora_layers=tensors,
            weight_name=tmp.name,
            unet_lora_adapter_metadata=config.to_dict(),
        )

    atomic_write(file, write)
    return file


def _component_folder(
    path: Path, index: dict[str, Any], name: str, classes: tuple[str, ...] | None
) -> Path:
    entry = index.get(name)
    if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
        raise CheckpointError(f"{path}: the pipeline lists no {name!r} component")
    if classes is not None and entry[1] not in classes:
        raise CheckpointError(
            f"{path}: component {name!r} is a {entry[1]}; diffattr loads {' or '.join(classes)}"
        )
    folder = path / name
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: component folder missing")
    return folder


def _model_files(folder: Path, library: str) -> list[Path]:
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{folder}: component config missing (no config.json)")
    weights = folder / _WEIGHTS_FILE[library]
    if weights.is_file():
        return [config, weights]
    shard_index = folder / f"{weights.name}.index.json"
    if not shard_index.is_file():
        raise CheckpointError(
            f"{folder}: no {weights.name} (diffattr reads safetensors weights only, never "
            "pickled .bin files)"
        )
    try:
        shards = sorted(set(read_json(shard_index)["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{shard_index}: malformed weight index ({err!r})") from err
    files = [path_inside(folder, shard, shard_index.name, CheckpointError) for shard in shards]
    missing = [shard for shard, file in zip(shards, files, strict=True) if not file.is_file()]
    if missing:
        raise CheckpointError(f"{folder}: weight shards {missing} of {shard_index.name} missing")
    return [config, shard_index, *files]


def _tokenizer_files(folder: Path) -> list[Path]:
    present = [folder / name for name in _TOKENIZER_FILES if (folder / name).is_file()]
    names = {file.name for file in present}
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        raise CheckpointError(f"{folder}: no tokenizer.json, nor vocab.json with merges.txt")
    return present


def _scheduler_config(file: Path) -> dict[str, Any]:
    try:
        config = read_json(file)
    except FileNotFoundError:
        raise CheckpointError(f"{file.parent}: component config missing (no {file.name})") from None
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    if "beta_schedule" not in config:
        raise CheckpointError(
            f"{file}: {config.get('_class_name')} has no beta schedule; diffattr needs one "
            "(DDPM-style noising)"
        )
    # Schedulers that never clip (PNDM, LMS, Euler: Stable Diffusion's) have no clip_sample,
    # and DDPM's default, clipping x0 to [-1, 1], would be wrong for latents.
    config.setdefault("clip_sample", False)
    try:
        scheduler = DDPMScheduler.from_config(config)
    except (ValueError, TypeError, NotImplementedError) as err:
        raise CheckpointError(f"{file}: not a usable noise schedule ({err})") from err
    return json.loads(scheduler.to_json_string())


def _adapter_path(path: Path, lora: str | os.PathLike[str] | None) -> Path | None:
    if lora is None:
        default = path / LORA_WEIGHTS_FILE
        return default if default.is_file() else None
    adapter = Path(lora)
    if adapter.is_dir():
        adapter = adapter / LORA_WEIGHTS_FILE
    if not adapter.is_file():
        raise CheckpointError(f"{adapter}: no such LoRA weights file")
    return adapter


def _pretrained(cls: type[ModelMixin] | type[CLIPTextModel], folder: Path) -> nn.Module:
    # float32 whatever the saved precision (the feature engine casts to the one it needs).
    # transformers 5 names the option dtype and defaults to the saved precision.
    dtype = {"torch_dtype" if issubclass(cls, ModelMixin) else "dtype": torch.float32}
    # transformers 5 shows a "Loading weights" bar on every load: progress is the caller's.
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, **dtype)
    except (OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(f"{folder}: cannot load {cls.__name__} ({err})") from err
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


def _meta_unet(folder: Path) -> UNet2DConditionModel:
    # Module names and shapes without weights: enough to check an adapter at open time.
    try:
        config = UNet2DConditionModel.load_config(folder, local_files_only=True)
        with torch.device("meta"):
            return UNet2DConditionModel.from_config(config)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{folder}: cannot build UNet2DConditionModel ({err})") from err


def _read_adapter(
    file: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, dict[str, Any] | None]:
    """The adapter as diffusers reads it: tensors (keys prefixed ``unet.``), alphas, metadata."""
    try:
        return StableDiffusionLoraLoaderMixin.lora_state_dict(
            str(file.parent),
            weight_name=file.name,
            local_files_only=True,
            use_safetensors=True,
            return_lora_metadata=True,
        )
    except (OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(f"{file}: unreadable LoRA weights ({err})") from err


def _check_adapter(unet: nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    """Raise ConfigError unless every adapter tensor names a UNet layer and fits its shape.

    diffusers only logs adapter keys that name no layer (and ignores them): checked here.
    """
    foreign = sorted({key.split(".", 1)[0] for key in state} - {"unet"})
    if foreign:
        raise ConfigError(
            f"LoRA adapter {file} adapts {foreign}: diffattr loads UNet adapters only"
        )
    adapter = {key.removeprefix("unet."): value for key, value in state.items()}
    if not adapter:
        raise ConfigError(f"LoRA adapter {file} holds no tensors")
    if "lora_A" not in next(iter(adapter)):
        # Older diffusers naming (to_q_lora.down); diffusers converts it the same way.
        adapter = convert_unet_state_dict_to_peft(adapter)
    layers = dict(unet.named_modules())
    absent: set[str] = set()
    misfits = []
    for key, value in adapter.items():
        name, _, role = key.partition(".lora_")
        weight = getattr(layers.get(name), "weight", None)
        if not isinstance(weight, torch.Tensor):
            absent.add(name)
        elif role == "A.weight" and value.shape[1] != weight.shape[1]:
            misfits.append(f"{key} takes {value.shape[1]} inputs, the layer {weight.shape[1]}")
        elif role.startswith("B.") and value.shape[0] != weight.shape[0]:
            misfits.append(f"{key} gives {value.shape[0]} outputs, the layer {weight.shape[0]}")
    problems = []
    if absent:
        problems.append(
            f"{len(absent)} of its layers are not in the UNet ({_some(sorted(absent))})"
        )
    if misfits:
        problems.append(f"{len(misfits)} tensors do not fit their layer ({_some(misfits)})")
    if problems:
        raise ConfigError(f"LoRA adapter {file} does not match the UNet: {'; '.join(problems)}")


def _some(items: list[str]) -> str:
    return "; ".join(items[:3]) + ("; ..." if len(items) > 3 else "")


def _load_adapter(unet: UNet2DConditionModel, file: Path) -> None:
    """Load the adapter into ``unet`` and freeze everything else."""
    state, network_alphas, metadata = _read_adapter(file)
    _check_adapter(unet, state, file)
    try:
        unet.load_lora_adapter(
            state,
            prefix="unet",
            adapter_name="default",
            network_alphas=network_alphas,
            metadata=metadata,
        )
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"LoRA adapter {file} does not match the UNet: {err}") from err
    unet.requires_grad_(False)
    for name in lora_parameter_names(unet):
        unet.get_parameter(name).requires_grad_(True)
