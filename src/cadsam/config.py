"""A training run's settings, merged in one place: the defaults, a YAML file, the command
line (its flags and ``--set NAME=VALUE``), the Python API's keywords and, on ``--resume``, the
run's own ``config.yaml``. Every setting has one name in all of them."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .backbones import DEFAULT_BATCH, DEFAULT_IMAGE_SIZE
from .data.io import parse_channels
from .data.labels import ClassTable, class_table
from .data.prompts import TRAIN_NAMES as PROMPT_TRAIN_NAMES
from .data.prompts import PromptSettings
from .errors import CadsamError
from .fast.runtime import Runtime, check_settings
from .files import check_output_folder
from .methods import (
    CACHEABLE,
    METHOD_OPTIONS,
    check_method_on_backbone,
    check_runtime_settings,
    resolve_options,
)
from .precision import PRECISIONS

SCHEDULES = ("cosine", "constant")
# Settings that only say how to run, not what is trained: they may differ on --resume.
RUNTIME_KEYS = ("out", "resume", "device", "num_workers", "progress", "tensorboard", "runtime")
# ... and these too: more epochs than the run's train it longer (see _extend)
RESUME_KEYS = (*RUNTIME_KEYS, "epochs")
TRAIN_WORKERS = 2  # data-loader processes unless num_workers is given


@dataclass
class TrainConfig:
    method: str
    backbone: str
    out: str
    checkpoint: str | None = None
    random_weights: bool = False  # a pretrained backbone on random weights, on purpose
    # data: --images/--masks, or --dataset/--data-root (+ split)
    images: str | None = None
    masks: str | None = None
    dataset: str | None = None
    data_root: str | None = None
    split: str = "train"
    mask_suffix: str | None = None  # a mask's stem is its image's plus this
    val_fraction: float | None = None
    val_images: str | None = None
    val_masks: str | None = None
    image_size: int = DEFAULT_IMAGE_SIZE
    augment: bool = True
    mask_threshold: int = 127
    # several classes: their number, or a class file (YAML/JSON) naming them; None: binary
    classes: str | None = None
    ignore_index: int | None = None  # the label maps' value for "no class" (the file's, or 255)
    coco_category: str | None = None  # masks in COCO JSON, binary task: the category to segment
    image_channels: str | None = None  # multi-channel images: which make the RGB ("4,0,2")
    # prompts drawn from the masks (data/prompts.py): whole (the paper's), box, points, box+points
    prompt: str = "whole"
    prompts_per_image: int = 4
    prompt_points: int = 1
    prompt_negatives: int = 0
    box_jitter: float = 0.02
    resize_masks: bool = False
    skip_bad: bool = False
    # optimisation (the paper's defaults)
    epochs: int = 20
    batch_size: int | None = None  # DEFAULT_BATCH's: 4, or 2 for vit_h and sam2.1_hiera_l
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.01
    schedule: str = "cosine"
    seed: int = 21
    precision: str = "fp32"
    # the method's model options (what is trained; saved with the weights)
    options: dict[str, Any] = field(default_factory=dict)
    # train from an embedding cache (cadsam cache): no image encoder in memory
    cache: str | None = None
    # how to run: a named runtime and settings on top ({"name": "auto", "cuda_graph": True})
    runtime: dict[str, Any] = field(default_factory=lambda: {"name": "auto"})
    device: str | None = None
    # on a GPU: stop before any weights load where cadsam plan counts more than is free
    memory_check: bool = True
    num_workers: int | None = None  # None: TRAIN_WORKERS, at most the usable cores
    resume: bool = False
    progress: bool = True
    tensorboard: bool = False  # also log to RUN/tensorboard (needs cadsam[tensorboard])

    def __post_init__(self) -> None:
        if isinstance(self.runtime, str):
            self.runtime = {"name": self.runtime}
        for name, hint in setting_types().items():
            setattr(self, name, typed_value(name, getattr(self, name), hint))
        if self.batch_size is None:
            self.batch_size = DEFAULT_BATCH.get(self.backbone, 4)
        self.runtime = {"name": "auto", **(self.runtime or {})}
        if self.schedule not in SCHEDULES:
            raise CadsamError(f"schedule must be one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise CadsamError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.method == "zero-shot":
            raise CadsamError("zero-shot has nothing to train: use cadsam eval --method zero-shot")
        if self.ignore_index is not None and self.classes is None:
            raise CadsamError("--ignore-index is for label maps: give --classes too")
        self.class_table()  # a class file that does not read, before any work
        self.channels()
        resolve_options(self.method, self.options)  # an option the method does not take
        check_method_on_backbone(self.method, self.backbone)  # before the data and weights
        name, settings = self.runtime_parts()
        check_settings(name, settings)  # before any work
        check_runtime_settings(self.method, settings)
        if self.cache and self.method not in CACHEABLE:
            raise CadsamError(
                f"{self.method} acts inside the image encoder, so it cannot train from cached "
                "embeddings: drop --cache"
            )
        for name, value in (
            ("--epochs", self.epochs),
            ("--batch-size", self.batch_size),
            ("grad_accum", self.grad_accum),  # a --set setting, not a flag
        ):
            if value < 1:
                raise CadsamError(f"{name} must be at least 1, got {value}")

    @classmethod
    def from_sources(cls, config_file: str | None, overrides: dict[str, Any]) -> TrainConfig:
        """Defaults, then the YAML file's values, then the command line's; ``options`` and
        ``runtime`` merge key by key."""
        values: dict[str, Any] = {}
        if config_file is not None:
            values.update(upgraded(load_yaml(config_file)))
        for key in ("options", "runtime"):
            if isinstance(values.get(key), str):
                values[key] = {"name": values[key]}
            if key in overrides:
                overrides = {**overrides, key: {**(values.get(key) or {}), **overrides[key]}}
        values.update(overrides)
        values.pop("written_by", None)  # what wrote a run's config.yaml: a record, not a setting
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CadsamError(f"unknown training setting(s): {', '.join(unknown)}")
        for required in ("method", "backbone", "out"):
            if values.get(required) is None:
                raise CadsamError(f"--{required} is required (on the command line or in --config)")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def class_table(self) -> ClassTable | None:
        """The classes the model predicts (None: the binary task)."""
        return class_table(self.classes, self.ignore_index)

    def prompt_settings(self) -> PromptSettings:
        named = {field: getattr(self, name) for field, name in PROMPT_TRAIN_NAMES.items()}
        return PromptSettings(self.prompt, **named)

    def channels(self) -> tuple[int, ...] | None:
        """The image channels read (None: the first three)."""
        return parse_channels(self.image_channels)

    def runtime_parts(self) -> tuple[str, dict[str, Any]]:
        """(named runtime, settings on top)."""
        settings = dict(self.runtime)
        return settings.pop("name"), settings


@functools.cache
def setting_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def typed_value(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` says the setting ``name`` holds, or one line refusing
    it: a YAML file reads ``2e-4`` as text and a quoted ``"4"`` too, and a value of the wrong
    type half-accepted fails later, after the run's folder is written (or never)."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):  # X | None
        if value is None:
            return None
        hint = next(kind for kind in typing.get_args(hint) if kind is not type(None))
    kind = typing.get_origin(hint) or hint
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in BOOLEAN_WORDS:
            return BOOLEAN_WORDS[value.strip().lower()]
        raise CadsamError(f"{name} must be true or false, not {_shown(value)}")
    if kind is int or kind is float:
        return _number(name, value, whole=kind is int)
    if kind is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise CadsamError(f"{name} must be text, not {_shown(value)}")
        return str(value)
    if kind is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise CadsamError(f"{name} must be a mapping of NAME: VALUE, not {_shown(value)}")
    return value


def _number(name: str, value: Any, whole: bool) -> int | float:
    """A number given as a number or as text; a whole one where ``whole`` (2.0 is 2)."""
    what = "a whole number" if whole else "a number"
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        try:  # digits as an int: a large seed stays exact
            number = int(text) if text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise CadsamError(f"{name} must be {what}, not {_shown(value)}")
    if not whole:
        return float(number)
    if number != int(number):
        raise CadsamError(f"{name} must be {what}, not {_shown(value)}")
    return int(number)


def _shown(value: Any) -> str:
    """A value as a user wrote it: true, 'high', 1.5, nothing."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def upgraded(values: dict[str, Any]) -> dict[str, Any]:
    """A config written before model and runtime options were told apart: its method options
    split into the two, ``cuda_graph`` into the runtime."""
    if "method_options" not in values and "cuda_graph" not in values:
        return values
    values = dict(values)
    old = dict(values.pop("method_options", None) or {})
    if old.pop("checkpoint_blocks", False):  # its name before checkpoint_encoder
        old["checkpoint_encoder"] = True
    settings = {f.name for f in dataclasses.fields(Runtime)}
    runtime = {"name": "auto", **(values.get("runtime") or {})}
    runtime.update({k: v for k, v in old.items() if k in settings})
    if values.pop("cuda_graph", False):
        runtime["cuda_graph"] = True
    # the rest are model options: one the method does not take is then an error naming it
    options = {k: v for k, v in old.items() if k not in settings}
    values["options"] = {**options, **(values.get("options") or {})}
    values["runtime"] = runtime
    return values


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise CadsamError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise CadsamError(f"cannot parse {path}: {exc}") from None
    if not isinstance(values, dict):
        raise CadsamError(f"{path} must hold a mapping of settings")
    return values


def sort_settings(flat: dict[str, Any], said_as: str = "") -> dict[str, Any]:
    """Settings given by name, as ``--set NAME=VALUE`` and the Python API give them, sorted
    into TrainConfig's keys: model options into ``options``, runtime switches (and
    ``runtime``, the named runtime) into ``runtime``, the rest as they are. An unknown name
    is an error that calls it ``said_as`` + its name (``--set NAME``)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"options", "runtime"}
    model_options = {name for accepted in METHOD_OPTIONS.values() for name in accepted}
    switches = {f.name for f in dataclasses.fields(Runtime)}
    sorted_: dict[str, Any] = {}
    options: dict[str, Any] = dict(flat.get("options") or {})
    runtime: dict[str, Any] = {}
    for name, value in flat.items():
        if name == "runtime":
            runtime.update({"name": value} if isinstance(value, str) else dict(value))
        elif name in switches:
            runtime[name] = value
        elif name in model_options:
            options[name] = value
        elif name in fields:
            sorted_[name] = value
        elif name != "options":
            raise CadsamError(
                f"{said_as}{name}: no such setting (model options: {', '.join(sorted(model_options))}; "
                "runtime settings and training settings: see cadsam train --help)"
            )
    if options:
        sorted_["options"] = options
    if runtime:
        sorted_["runtime"] = runtime
    return sorted_


def _typed(name: str, value: Any) -> Any:
    """A setting as TrainConfig holds it (``"1e-2"`` is 0.01), to compare; as given if not."""
    hint = setting_types().get(name)
    return value if hint is None or value is None else typed_value(name, value, hint)


def resumed_settings(out: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """On --resume the run's own config.yaml decides; settings that contradict it are errors,
    except how to run and the epochs (more epochs train the run longer)."""
    if out is None:
        raise CadsamError("--resume continues the run in --out: give --out RUN")
    check_output_folder(out, "--out")
    saved_path = Path(out) / "config.yaml"
    if not saved_path.is_file():
        raise CadsamError(f"nothing to resume in {out} (no config.yaml)")
    saved = upgraded(load_yaml(saved_path))
    for key, value in given.items():
        if key == "options":
            value = {**saved.get("options", {}), **value}
        if key not in RESUME_KEYS and _typed(key, saved.get(key)) != _typed(key, value):
            raise CadsamError(
                f"--{key.replace('_', '-')} {value} differs from the run's {saved.get(key)}"
            )
    if "runtime" in given:  # how to run may change; the run's own choice holds otherwise
        given = {**given, "runtime": {**saved.get("runtime", {}), **given["runtime"]}}
    return {**saved, **{k: v for k, v in given.items() if k in RESUME_KEYS}}


def run_config(config_file: str | os.PathLike | None, given: dict[str, Any]) -> TrainConfig:
    """The run's TrainConfig from a YAML file and settings by name (already sorted); on
    ``resume`` the run's own config decides."""
    if given.get("resume"):
        return TrainConfig.from_sources(None, resumed_settings(given.get("out"), given))
    return TrainConfig.from_sources(config_file, given)
