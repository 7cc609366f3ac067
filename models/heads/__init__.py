"""Pluggable heads (``vstream.models.heads``): components from the project's source
papers that attach to the model layer, chosen by name.

    @register_head("visual_experts")
    class VisualExperts(Head): ...

    head = create_head("visual_experts", model=lm, **config)
    list_heads()

    attach_head(chat_model, "visual_experts:weights=experts/")   # one string names a head

A head is one file in this folder that registers itself; ``create_head`` imports the
head modules on first use. An unknown name raises ``ConfigError`` listing the known
ones. A head that changes how the model answers is attached to a ``ChatModel``
(``attach_head``, or ``load_model(name, heads=[...])``, ``--head`` on the command
line): every answer's generation then runs inside ``head.routing(visual)``, with the
prompt's ``[1, L]`` mask of memory tokens. The frame-encoder head (big.LITTLE)
registers with ``vstream.encoders`` instead, since it is a frame encoder
(``--encoder biglittle:big=...,little=...``). A head that is only a trained module of the
model's own (the projector, the abstract attention) derives from ``ModuleWeights``.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from pathlib import Path

from vstream.config import parse_spec
from vstream.errors import ConfigError, ModelLoadError

_HEADS: dict[str, type] = {}


class Head:
    """Base of every head: ``name`` (the registry name) and ``config`` (its config
    dataclass, or None)."""

    name = ""

    def __init__(self, config=None):
        self.config = config

    @classmethod
    def attach(cls, chat_model, **options) -> Head:
        """A head of this kind on ``chat_model`` (a ``ChatModel``), configured by
        ``options``: what ``attach_head`` calls. Heads that can attach override it."""
        raise ConfigError(f"the {cls.name!r} head does not attach to a chat model; create it with create_head")

    def routing(self, visual):
        """Context for one answer's forwards; ``visual`` is the prompt's ``[1, L]`` bool
        mask of memory tokens. Default: nothing to do."""
        return contextlib.nullcontext()


def register_head(name: str):
    """Class decorator: make a head creatable by ``create_head(name)``."""

    def register(cls):
        cls.name = name
        _HEADS[name] = cls
        return cls

    return register


def _load_heads() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def list_heads() -> list[str]:
    """Names of the registered heads."""
    _load_heads()
    return sorted(_HEADS)


def create_head(name: str, *args, **kwargs) -> Head:
    """A new head of kind ``name``; the arguments go to its constructor."""
    return _head_class(name)(*args, **kwargs)


def _head_class(name: str) -> type:
    _load_heads()
    if name not in _HEADS:
        raise ConfigError(f"unknown head {name!r}; known: {', '.join(sorted(_HEADS)) or '(none)'}")
    return _HEADS[name]


def trained_weights(head: str, weights: str | None, file: str) -> dict:
    """The tensors a ``vstream train`` run saved for the ``head`` head, from ``weights``
    (its output folder) / ``file``: ``ConfigError`` without a folder, ``ModelLoadError``
    naming the file when it is absent or unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if weights is None:
        raise ConfigError(f"the {head} head needs weights=FOLDER (a vstream train output)")
    path = Path(weights) / file
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no {head} weights there") from None
    except (OSError, SafetensorError) as exc:
        raise ModelLoadError(f"{path}: cannot read the {head} weights ({exc})") from None


class ModuleWeights(Head):
    """Base of a head that is one of the model's own modules (``module_of``), trained by
    ``vstream train``: ``save`` writes its weights as ``file`` into the run's output
    folder, and ``attach`` (``--head NAME:weights=FOLDER``) loads them back in place, on
    the module's device and in its dtypes, refusing a file whose tensor names or shapes
    are those of another ``what``. It changes no forward: the weights did."""

    file = ""
    what = ""

    def __init__(self, folder: str):
        super().__init__(None)
        self.folder = folder

    @classmethod
    def module_of(cls, chat_model):
        """The module of ``chat_model`` these weights are (``ConfigError`` when it has none)."""
        raise NotImplementedError

    @classmethod
    def save(cls, chat_model, folder) -> Path:
        """Write the module's weights into ``folder`` (made if missing); returns the file."""
        from safetensors.torch import save_file

        path = Path(folder) / cls.file
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in cls.module_of(chat_model).state_dict().items()},
                  str(path))
        return path

    @classmethod
    def attach(cls, chat_model, weights: str | None = None) -> ModuleWeights:
        module = cls.module_of(chat_model)
        saved, own = trained_weights(cls.name, weights, cls.file), module.state_dict()
        if set(saved) != set(own) or any(saved[k].shape != own[k].shape for k in own):
            raise ModelLoadError(f"{Path(weights) / cls.file}: the weights are of another {cls.what}: "
                                 f"{sorted((k, tuple(v.shape)) for k, v in saved.items())} against this model's "
                                 f"{sorted((k, tuple(v.shape)) for k, v in own.items())}")
        module.load_state_dict({k: v.to(own[k].device, own[k].dtype) for k, v in saved.items()})
        return cls(weights)


def attach_head(chat_model, spec: str) -> Head:
    """Attach the head named by ``spec`` (``"name"`` or ``"name:key=value,..."``, see
    ``vstream.config.parse_spec``) to ``chat_model`` and return it."""
    name, options = parse_spec(spec)
    head = _head_class(name).attach(chat_model, **options)
    chat_model.add_head(head)
    return head
