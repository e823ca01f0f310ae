"""The model registry: models (code signed once) and immutable versions with lineage, in SQL.

    registry = ModelRegistry(Database.from_settings(settings), KeySigner.from_settings(settings))
    v1 = registry.register("digits", code, weights)
    v2 = registry.add_version("digits", new_weights, round_id=7, strategy="fedavg", metrics={...})
    registry.rollback("digits", 1)          # v3 = v1's weights, v2 marked rolled back

See :mod:`coordinator.registry.store` for the contract and docs/registry.md for the CLI.
"""

from __future__ import annotations

from coordinator.registry.records import LayerDiff, ModelInfo, StoredCode, VersionInfo
from coordinator.registry.signer import KIND_MODEL_WEIGHTS, KeySigner, Signer, verify_version
from coordinator.registry.store import ModelRegistry, layout_of

__all__ = [
    "KIND_MODEL_WEIGHTS",
    "KeySigner",
    "LayerDiff",
    "ModelInfo",
    "ModelRegistry",
    "Signer",
    "StoredCode",
    "VersionInfo",
    "layout_of",
    "verify_version",
]
