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
    declared = declared_params()
    for param in kind.params:
        if param.name in ("kind", "top_k") or (param.name in declared and declared[param.name] != param):
            raise ValueError(f"register: loss kind {kind.name!r} declares parameter {param.name!r}, which another "
                             f"kind (or LossConfig itself) declares differently")
    _KINDS[kind.name] = kind
    return cls


def kind_names():
    """The registered kind names, in registration order."""
    return tuple(_KINDS)


def declared_params():
    """{field name: Param} of every registered kind's hyper-parameters, in registration order.

    Two kinds may share a parameter (the same name, default and flag); a clash is refused at
    registration."""
    declared = {}
    for kind in _KINDS.values():
        for param in kind.params:
            declared.setdefault(param.name, param)
    return declared


def get_kind(name) -> LossKind:
    """The registered kind called `name`."""
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"unknown loss kind {name!r}; expected one of {kind_names()}") from None
