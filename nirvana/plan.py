"""Plain data passed between the stages: a model's geometry and the pruning plan (``plan.json``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

PLAN_VERSION = 1


@dataclass(frozen=True)
class Geometry:
    """The prunable shape of a decoder: every layer is assumed alike before pruning."""

    num_layers: int
    hidden_size: int
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    gated: bool = True  # gate/up/down (SwiGLU, GeGLU) rather than up/down

    @property
    def group_size(self) -> int:
        """Query heads per KV head (G); 1 is plain multi-head attention."""
        return self.num_heads // self.num_kv_heads

    @property
    def attn_params_per_group(self) -> int:
        """Parameters of one KV group: G q heads, one k and one v head, and G o_proj heads."""
        return 2 * (self.group_size + 1) * self.head_dim * self.hidden_size

    @property
    def mlp_params_per_channel(self) -> int:
        return (3 if self.gated else 2) * self.hidden_size

    @property
    def prunable_params(self) -> int:
        per_layer = (
            self.num_kv_heads * self.attn_params_per_group + self.intermediate_size * self.mlp_params_per_channel
        )
        return self.num_layers * per_layer

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class LayerPlan:
    kv_groups_kept: list[int]
    mlp_channels_kept: list[int]


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
            len(lp.kv_groups_kept) * g.attn_params_per_group + len(lp.mlp_channels_kept) * g.mlp_params_per_channel
            for lp in self.layers
        )

    def achieved_sparsity(self) -> float:
        total = self.geometry.prunable_params
        return 1.0 - self.kept_params() / total if total else 0.0

    def is_uniform(self) -> bool:
        widths = {(len(lp.kv_groups_kept), len(lp.mlp_channels_kept)) for lp in self.layers}
        return len(widths) <= 1

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "architecture": self.architecture,
            "geometry": self.geometry.to_dict(),
            "layers": [asdict(lp) for lp in self.layers],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> PruningPlan:
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version: expected {PLAN_VERSION}, got {d.get('version')!r}")
        geometry = Geometry.from_dict(d["geometry"])
        layers = [LayerPlan(list(lp["kv_groups_kept"]), list(lp["mlp_channels_kept"])) for lp in d["layers"]]
        plan = cls(d["architecture"], geometry, layers, d["version"], dict(d.get("meta", {})))
        plan.validate()
        return plan

    def validate(self) -> None:
        g = self.geometry
        if len(self.layers) != g.num_layers:
            raise ValueError(f"plan layers: {len(self.layers)} entries for a model of {g.num_layers} layers")
        for i, lp in enumerate(self.layers):
            for name, kept, limit in (
                ("kv_groups_kept", lp.kv_groups_kept, g.num_kv_heads),
                ("mlp_channels_kept", lp.mlp_channels_kept, g.intermediate_size),
            ):
                if any(b <= a for a, b in zip(kept, kept[1:])):
                    raise ValueError(f"layers[{i}].{name}: indices must be strictly increasing")
                if kept and (kept[0] < 0 or kept[-1] >= limit):
                    raise ValueError(f"layers[{i}].{name}: index out of range [0, {limit})")
            if not lp.kv_groups_kept:
                raise ValueError(f"layers[{i}].kv_groups_kept: every layer must keep at least one KV group")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        return cls.from_dict(json.loads(Path(path).read_text()))
