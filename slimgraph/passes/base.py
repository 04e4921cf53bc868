"""The pass API: `Pass`, `PassConfig`, `PassResult`, `PassContext`, and the registry.

A pass is one small class in one file:

    @register_pass
    class FoldBatchNorm(Pass):
        '''Fold BatchNormalization into the preceding Conv (exact).'''
        name = "fold_batchnorm"
        class Config(PassConfig):
            epsilon_check: float = float_range(0.0, 1e-3, default=0.0)
        def run(self, model, ctx):
            count = fold_every_pair(model)      # the rewrite itself
            return PassResult(model, modified=count > 0, stats={"folded": count})

Passes mutate the model in place; the `PassManager` clones the pipeline's input first,
so an input model is never modified. `modified` must be true exactly when the model
changed: the manager's fixed points and the search's cache depend on it.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib.metadata
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import pydantic

from slimgraph.errors import PassError, PipelineError
from slimgraph.ir.model import Model

logger = logging.getLogger("slimgraph.passes")

ENTRY_POINT_GROUP = "slimgraph.passes"


# --- config and search domains ------------------------------------------------------------
class PassConfig(pydantic.BaseModel):
    """Typed pass configuration. Unknown keys and wrong types are errors."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    @pydantic.model_validator(mode="after")
    def _values_in_declared_choices(self):
        for name, domain in search_domains(type(self)).items():
            options = domain.get("choice")
            if options is not None and getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {options}, got {getattr(self, name)!r}")
        return self


def choice(*options: Any, default: Any) -> Any:
    """A config field whose search domain is a finite set of options."""
    return pydantic.Field(default=default, json_schema_extra={"domain": {"choice": list(options)}})


def int_range(low: int, high: int, *, default: int, log: bool = False) -> Any:
    """An integer config field searched in [low, high]."""
    return pydantic.Field(
        default=default, ge=low, le=high,
        json_schema_extra={"domain": {"int": [low, high], "log": log}},
    )


def float_range(low: float, high: float, *, default: float, log: bool = False) -> Any:
    """A float config field searched in [low, high]."""
    return pydantic.Field(
        default=default, ge=low, le=high,
        json_schema_extra={"domain": {"float": [low, high], "log": log}},
    )


def search_domains(config_cls: type[PassConfig]) -> dict[str, dict]:
    """The declared search domain of each field that has one."""
    out = {}
    for name, field in config_cls.model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and "domain" in extra:
            out[name] = extra["domain"]
    return out


# --- results and context --------------------------------------------------------------------
@dataclasses.dataclass
class PassResult:
    model: Model
    modified: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PassContext:
    """What a pass may use besides the model. Rebuilt per run; never global state.

    data: sample inputs, `{input_name: array[N, ...]}` (calibration / verification).
    labels: optional labels for training passes.
    input_model: the pipeline's input model, as given (never to be modified), set by the
        PassManager; `train.distill(teacher: input)` distils from it.
    """

    data: Mapping[str, np.ndarray] | None = None
    labels: np.ndarray | None = None
    seed: int = 0
    target: str = "cpu"
    progress: bool = True
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    input_model: Model | None = None

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    def seed_everything(self) -> None:
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)


# --- passes ---------------------------------------------------------------------------------
# What a pass may declare in `requires`, and how the manager checks it before running.
REQUIREMENTS: dict[str, Callable[[PassContext], str | None]] = {
    "data": lambda ctx: None if ctx.data else "sample data (--data D.npz)",
    "labels": lambda ctx: None if ctx.labels is not None else "labels (a 'labels' array in --data)",
    "torch": lambda ctx: None if _has_module("torch") else "the torch extra (pip install slimgraph[torch])",
}


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


class Pass(abc.ABC):
    """Base class of every pass. Subclasses set the class attributes and `run`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[PassConfig]] = PassConfig
    #: True when the pass never changes the model's outputs (checked to ~1e-5 by --verify).
    exact: ClassVar[bool] = True
    #: Entries of REQUIREMENTS this pass needs.
    requires: ClassVar[tuple[str, ...]] = ()
    #: Analyses that stay valid after this pass modifies the model.
    preserves: ClassVar[tuple[str, ...]] = ()
    #: Order constraints, as fnmatch patterns of pass names (a `!pattern` excludes what
    #: it matches): when both appear in a pipeline, this pass must run after every pass
    #: matching `after`, and before every pass matching `before`.
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    #: Bumped whenever the pass's behaviour changes; part of every cache key.
    version: ClassVar[int] = 1

    def __init__(self, config: PassConfig | Mapping[str, Any] | None = None, **kwargs: Any):
        if isinstance(config, PassConfig):
            self.config = config
        else:
            params = {**dict(config or {}), **kwargs}
            try:
                self.config = self.Config(**params)
            except pydantic.ValidationError as e:
                raise PipelineError(f"pass {self.name!r}: bad config: {_describe(e)}") from None

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @abc.abstractmethod
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        """Transform `model` in place; return PassResult(model, modified, stats)."""

    def __call__(self, model: Model, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        result = self.run(model, ctx)
        if not isinstance(result, PassResult):
            raise PassError(self.name, f"run() returned {type(result).__name__}, not PassResult")
        if result.modified:
            result.model.bump(self.preserves)
        return result

    def spec(self) -> dict[str, Any]:
        """Name + the config fields that differ from defaults (canonical, for cache keys)."""
        return {self.name: self.config.model_dump(exclude_defaults=True, mode="json")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.model_dump(exclude_defaults=True).items())
        return f"{self.name}({args})" if args else self.name


def _describe(e: pydantic.ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        parts.append(f"{loc}: {err['msg']}" + (f" (got {err['input']!r})" if "input" in err else ""))
    return "; ".join(parts)


# --- registry -------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Pass]] = {}
_entry_points_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass usable by name from recipes, the CLI and the search."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set a `name`")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise TypeError(f"pass name {cls.name!r} is taken by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    """All registered passes: built-ins plus third-party entry points."""
    _load_builtin_and_plugins()
    return dict(_REGISTRY)


def get_pass(name: str) -> type[Pass]:
    reg = registry()
    if name not in reg:
        import difflib

        close = difflib.get_close_matches(name, reg, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `slimgraph passes` lists them"
        raise PipelineError(f"unknown pass {name!r}{hint}")
    return reg[name]


def _load_builtin_and_plugins() -> None:
    global _entry_points_loaded
    import slimgraph.passes  # noqa: F401  (imports every built-in pass module)

    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except ImportError as e:
            logger.warning("third-party pass %s (%s) failed to import: %s", ep.name, ep.value, e)
            continue
        if isinstance(obj, type) and issubclass(obj, Pass):
            register_pass(obj)
