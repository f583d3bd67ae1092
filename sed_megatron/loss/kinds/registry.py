"""Loss kinds by name: each kind's module registers one instance of its class on import."""

from .base import LossKind

_KINDS: dict[str, LossKind] = {}


def register(cls):
    """Class decorator: registers one instance of a LossKind subclass under its `name`."""
    kind = cls()
    if not isinstance(kind, LossKind) or not kind.name:
        raise TypeError(f"register: {cls.__name__} must be a LossKind subclass with a name")
    if kind.name in _KINDS:
        raise ValueError(f"register: loss kind {kind.name!r} is already registered ({type(_KINDS[kind.name]).__name__})")
    _KINDS[kind.name] = kind
    return cls


def kind_names():
    """The registered kind names, in registration order."""
    return tuple(_KINDS)


def get_kind(name) -> LossKind:
    """The registered kind called `name`."""
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"unknown loss kind {name!r}; expected one of {kind_names()}") from None
