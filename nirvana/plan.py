"""Plain data passed between the stages: a model's geometry and the pruning plan (``plan.json``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

PLAN_VERSION = 1
# Geometry fields that count something: every model has at least one of each.
_POSITIVE_FIELDS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")
_COUNT_FIELDS = ("encoder_layers", "cross_attention_layers")  # 0 for a decoder-only model


def is_index(value) -> bool:
    """Whether ``value`` is a plain int: a float such as 1.5 (or 1.0) or a bool is not an index."""
    return isinstance(value, int) and not isinstance(value, bool)


_KIND_NAMES = {int: "an integer", bool: "true or false", str: "a string", list: "a list", dict: "a JSON object"}


def _require(d, name: str, kind: type, where: str):
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if name not in d:
        raise ValueError(f"{where}.{name}: missing")
    value = d[name]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ValueError(f"{where}.{name}: expected {_KIND_NAMES[kind]}, got {value!r}")
    return value


def _index_list(d: dict, name: str, where: str) -> list[int]:
    values = _require(d, name, list, where)
    for value in values:
        if not is_index(value):
            raise ValueError(f"{where}.{name}: index {value!r} is not an integer")
    return list(values)


@dataclass(frozen=True)
class Geometry:
    """The prunable shape of a model: every layer is assumed alike before pruning.

    A decoder-only model has ``num_layers`` layers, each one attention block and one MLP. An
    encoder-decoder (T5) lists its encoder layers first, then its decoder layers (``num_layers`` counts
    both stacks), and each of the last ``cross_attention_layers`` layers has a second attention block,
    its cross-attention. Attention blocks are numbered ("attention rows", see
    :attr:`num_attention_blocks`): rows ``[0, num_layers)`` are each layer's self-attention, rows
    ``[num_layers, num_layers + cross_attention_layers)`` the cross-attention of the decoder layers in
    order. :meth:`sections` names the row ranges. The two encoder-decoder fields are 0 for
    decoder-only models and then left out of :meth:`to_dict`, so their plans and scores are unchanged.
    """

    num_layers: int
    hidden_size: int
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    gated: bool = True  # gate/up/down (SwiGLU, GeGLU) rather than up/down
    encoder_layers: int = 0  # the first encoder_layers layers are an encoder stack
    cross_attention_layers: int = 0  # the last cross_attention_layers layers also have a cross-attention

    @property
    def group_size(self) -> int:
        """Query heads per KV head (G); 1 is plain multi-head attention."""
        return self.num_heads // self.num_kv_heads

    @property
    def num_attention_blocks(self) -> int:
        """Attention blocks (rows of the attention scores): every layer's self-attention, then the cross-attentions."""
        return self.num_layers + self.cross_attention_layers

    @property
    def attn_params_per_group(self) -> int:
        """Parameters of one KV group: G q heads, one k and one v head, and G o_proj heads."""
        return 2 * (self.group_size + 1) * self.head_dim * self.hidden_size

    @property
    def mlp_params_per_channel(self) -> int:
        return (3 if self.gated else 2) * self.hidden_size

    @property
    def prunable_params(self) -> int:
        attn = self.num_attention_blocks * self.num_kv_heads * self.attn_params_per_group
        return attn + self.num_layers * self.intermediate_size * self.mlp_params_per_channel

    def sections(self) -> dict[str, tuple[str, int, int]]:
        """Named ranges of rows: ``name -> (tensor, start, stop)``, tensor ``"attention"`` or ``"mlp"``.

        Decoder-only: ``attention`` and ``mlp`` over all layers. Encoder-decoder: one pair per stack,
        ``encoder.attention``/``encoder.mlp`` and ``decoder.attention``/``decoder.mlp`` (self-attention),
        plus ``decoder.cross_attention``.
        """
        n, e, c = self.num_layers, self.encoder_layers, self.cross_attention_layers
        if not e and not c:
            return {"attention": ("attention", 0, n), "mlp": ("mlp", 0, n)}
        out = {}
        if e:
            out.update({"encoder.attention": ("attention", 0, e), "encoder.mlp": ("mlp", 0, e)})
        out.update({"decoder.attention": ("attention", e, n), "decoder.mlp": ("mlp", e, n)})
        if c:
            out["decoder.cross_attention"] = ("attention", n, n + c)
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("encoder_layers", "cross_attention_layers"):
            if not d[name]:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "geometry") -> Geometry:
        """The geometry ``to_dict`` wrote; a ValueError names ``where.field`` when a field is missing or mistyped."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        for name in _POSITIVE_FIELDS:
            if _require(d, name, int, where) < 1:
                raise ValueError(f"{where}.{name}: must be a positive integer, got {d[name]!r}")
        for name in _COUNT_FIELDS:
            if name in d and (not is_index(d[name]) or d[name] < 0):
                raise ValueError(f"{where}.{name}: must be an integer >= 0, got {d[name]!r}")
        if "gated" in d:
            _require(d, "gated", bool, where)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class LayerPlan:
    """One layer's kept units; ``cross_kv_groups_kept`` only for a layer with a cross-attention (else None)."""

    kv_groups_kept: list[int]
    mlp_channels_kept: list[int]
    cross_kv_groups_kept: list[int] | None = None

    def to_dict(self) -> dict:
        d = {"kv_groups_kept": list(self.kv_groups_kept), "mlp_channels_kept": list(self.mlp_channels_kept)}
        if self.cross_kv_groups_kept is not None:
            d["cross_kv_groups_kept"] = list(self.cross_kv_groups_kept)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "layer") -> LayerPlan:
        """The layer ``to_dict`` wrote; a ValueError names ``where.field`` and the value when one is not a list
        of integers (a float or bool index is refused, never truncated)."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        kv, mlp = _index_list(d, "kv_groups_kept", where), _index_list(d, "mlp_channels_kept", where)
        cross = None if d.get("cross_kv_groups_kept") is None else _index_list(d, "cross_kv_groups_kept", where)
        return cls(kv, mlp, cross)

    def attention_blocks(self) -> list[list[int]]:
        """The kept KV groups of each attention block of the layer: self-attention, then any cross-attention."""
        return [self.kv_groups_kept] + ([] if self.cross_kv_groups_kept is None else [self.cross_kv_groups_kept])


@dataclass
class PruningPlan:
    """Which KV groups and MLP channels each layer keeps; indices are sorted and refer to the dense model."""

    architecture: str
    geometry: Geometry
    layers: list[LayerPlan]
    version: int = PLAN_VERSION
    meta: dict = field(default_factory=dict)  # how it was made: sparsity, gamma, method, ...

    def kept_params(self) -> int:
        g = self.geometry
        return sum(
            sum(map(len, lp.attention_blocks())) * g.attn_params_per_group
            + len(lp.mlp_channels_kept) * g.mlp_params_per_channel
            for lp in self.layers
        )

    def achieved_sparsity(self) -> float:
        total = self.geometry.prunable_params
        return 1.0 - self.kept_params() / total if total else 0.0

    def is_uniform(self) -> bool:
        widths = {(*map(len, lp.attention_blocks()), len(lp.mlp_channels_kept)) for lp in self.layers}
        return len(widths) <= 1

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "architecture": self.architecture,
            "geometry": self.geometry.to_dict(),
            "layers": [lp.to_dict() for lp in self.layers],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> PruningPlan:
        """The plan ``to_dict`` wrote, validated; a ValueError names the first missing or mistyped field."""
        if not isinstance(d, dict):
            raise ValueError(f"plan: expected a JSON object, got {type(d).__name__}")
        if d.get("version") != PLAN_VERSION or isinstance(d.get("version"), bool):
            raise ValueError(f"plan version: expected {PLAN_VERSION}, got {d.get('version')!r}")
        architecture = _require(d, "architecture", str, "plan")
        geometry = Geometry.from_dict(_require(d, "geometry", dict, "plan"))
        layers = [LayerPlan.from_dict(lp, f"layers[{i}]") for i, lp in enumerate(_require(d, "layers", list, "plan"))]
        meta = _require(d, "meta", dict, "plan") if "meta" in d else {}
        plan = cls(architecture, geometry, layers, d["version"], dict(meta))
        plan.validate()
        return plan

    def validate(self) -> None:
        g = self.geometry
        if len(self.layers) != g.num_layers:
            raise ValueError(f"plan layers: {len(self.layers)} entries for a model of {g.num_layers} layers")
        first_cross = g.num_layers - g.cross_attention_layers
        for i, lp in enumerate(self.layers):
            if (lp.cross_kv_groups_kept is not None) != (i >= first_cross):
                want = "a" if i >= first_cross else "no"
                raise ValueError(f"layers[{i}].cross_kv_groups_kept: this layer has {want} cross-attention")
            for name, kept, limit in (
                ("kv_groups_kept", lp.kv_groups_kept, g.num_kv_heads),
                ("mlp_channels_kept", lp.mlp_channels_kept, g.intermediate_size),
                ("cross_kv_groups_kept", lp.cross_kv_groups_kept or [], g.num_kv_heads),
            ):
                bad = next((v for v in kept if not is_index(v)), None)
                if bad is not None:
                    raise ValueError(f"layers[{i}].{name}: index {bad!r} is not an integer")
                if any(b <= a for a, b in zip(kept, kept[1:])):
                    raise ValueError(f"layers[{i}].{name}: indices must be strictly increasing")
                if kept and (kept[0] < 0 or kept[-1] >= limit):
                    raise ValueError(f"layers[{i}].{name}: index out of range [0, {limit})")
            if not lp.kv_groups_kept:
                raise ValueError(f"layers[{i}].kv_groups_kept: every layer must keep at least one KV group")
            if lp.cross_kv_groups_kept == []:
                raise ValueError(f"layers[{i}].cross_kv_groups_kept: every cross-attention must keep at least one head")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        """Read a ``plan.json``; any unreadable, non-UTF-8, non-JSON or malformed file is a one-line ValueError
        naming it (a missing file stays a FileNotFoundError)."""
        where = f"plan: {str(path)!r}"
        try:
            text = Path(path).read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"{where} does not exist") from None
        except IsADirectoryError:
            raise ValueError(f"{where} is a folder, not a plan.json file") from None
        except PermissionError:
            raise ValueError(f"{where} cannot be read (permission denied)") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{where} is not UTF-8 text (byte {e.start}); not a plan.json") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        except RecursionError:
            raise ValueError(f"{where} is not a plan.json (JSON nested too deeply)") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{where} is not a valid plan ({e})") from None
