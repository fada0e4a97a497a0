"""What the status API reads of the running control plane: a small read-only interface the
runtime satisfies (structurally; status does not import the runtime). No I/O.

The one write is `release_withheld`, an operator's request to offer withheld objects again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry

from controlplane.model.mesh import Mesh
from controlplane.model.raw import ObjectKey
from controlplane.xds.server import Connection


class StatusView(Protocol):
    """Readiness, the mesh, connected proxies and their degradation, withheld objects."""

    @property
    def ready(self) -> bool:
        """Every source has synced once."""

    @property
    def leader(self) -> bool | None:
        """Whether this replica leads (None: no leader election)."""

    def unsynced_sources(self) -> list[str]: ...

    def mesh(self) -> Mesh: ...

    def store_generation(self) -> int: ...

    def connections(self) -> list[Connection]: ...

    def degradation(self, conn: Connection) -> list[dict[str, object]]:
        """What `conn`'s proxy should receive and does not, and why."""

    def quarantined(self) -> Mapping[ObjectKey, str]:
        """Objects withheld mesh-wide, with the reason."""

    def location_of(self, key: ObjectKey) -> str | None:
        """The file:line an object came from (directory sources), else None."""

    def control_summary(self) -> dict[str, object]:
        """xDS authentication mode and NACK-policy counters."""

    def metrics_registry(self) -> CollectorRegistry: ...

    def release_withheld(self, keys: list[ObjectKey]) -> list[ObjectKey]:
        """Offer withheld objects again (safe from the API's thread); returns those released."""
