"""LossConfig: which per-token SFT loss to compute (CE, DFT, SED, GEM, or a kind of one's own) and its parameters.

    cfg = LossConfig(kind="sed", top_k=2, tau=0.8, lam=1.0)
    cfg.tau, cfg.replace(tau=0.6), LossConfig.field_names()

Its fields are `kind`, `top_k`, and the hyper-parameters every registered loss kind declares
(`LossKind.params`: SED's tau, lam, mask; GEM's gem_beta, gem_h), each with its default; a kind
reads only its own. The fields are read from the registry when a config is made, so a kind
registered at run time brings its own. Immutable and hashable; every error names the field.
"""

from .kinds import declared_params, get_kind, kind_names

IGNORE_INDEX = -100
"""Target id of positions that carry no loss (prompt tokens, padding)."""

LOSS_KINDS = kind_names()
"""The kinds registered by sed_megatron.loss.kinds on import: ("ce", "dft", "sed", "gem")."""

COMMON_FIELDS = {"kind": "ce", "top_k": 2}
"""The fields every kind has: the kind's name, and k of the top-k probability mass P_topk that every
kind reports (and SED's mask reads; paper: 2)."""


class LossConfig:
    """Which token loss to compute and its hyper-parameters (see the module docstring)."""

    __slots__ = ("_values",)

    def __init__(self, kind="ce", top_k=2, **params):
        declared = declared_params()
        unknown = sorted(set(params) - set(declared))
        if unknown:
            raise TypeError(f"LossConfig: unknown field {unknown[0]!r} (fields: {', '.join(self.field_names())})")
        values = {"kind": kind, "top_k": top_k, **{name: param.default for name, param in declared.items()}, **params}
        object.__setattr__(self, "_values", values)
        if kind not in kind_names():
            raise ValueError(f"LossConfig.kind: unknown loss kind {kind!r}; expected one of {kind_names()}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"LossConfig.top_k: must be an integer >= 1, got {top_k!r}")
        for name, param in declared.items():
            problem = param.problem(values[name])
            if problem is not None:
                raise ValueError(f"LossConfig.{name}: {problem}")
        get_kind(kind).validate(self)

    @staticmethod
    def field_names():
        """("kind", "top_k", then every registered kind's parameters)."""
        return (*COMMON_FIELDS, *declared_params())

    def __getattr__(self, name):
        try:
            return object.__getattribute__(self, "_values")[name]
        except KeyError:
            raise AttributeError(f"LossConfig has no field {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError(f"LossConfig is immutable: use cfg.replace({name}=...)")

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return LossConfig(**{**self._values, **changes})

    def as_dict(self):
        return dict(self._values)

    def __eq__(self, other):
        return isinstance(other, LossConfig) and self._values == other._values

    def __hash__(self):
        return hash(tuple(sorted(self._values.items(), key=lambda item: item[0])))

    def __repr__(self):
        return f"LossConfig({', '.join(f'{name}={value!r}' for name, value in self._values.items())})"

    def __reduce__(self):  # pickles by its fields (processes started with spawn rebuild it)
        return _rebuild, (dict(self._values),)


def _rebuild(values):
    return LossConfig(**values)
