"""The one Ray bootstrap every stage uses: join a cluster (``address``) or start an embedded one on 127.0.0.1.

Ingest, precompute, recaption and evaluation all call ``ensure_ray``; none calls ``ray.init`` itself, so
the loopback binding, the dashboard default and the object-store cap are decided in one place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("tessera.ray")


@dataclass(kw_only=True)
class RayConfig:
    """How to reach Ray: start an embedded runtime (``address: null``) or join ``address``."""

    address: str | None = None  # None: embedded runtime on this machine; "auto" or ray://...: join a cluster
    num_cpus: int | None = None  # embedded runtime only; None -> all cores
    include_dashboard: bool = False
    dashboard_host: str = "127.0.0.1"  # never 0.0.0.0 unless a config says so
    object_store_memory_mb: int | None = None  # embedded runtime only; None -> Ray's default (30% RAM)

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1, got {self.num_cpus}")


def ensure_ray(cfg: RayConfig | None = None) -> bool:
    """Connect this process to Ray unless it already is; returns True when this call started it (the caller
    then owns the runtime and shuts it down with ``ray.shutdown()``)."""
    import ray

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return False
    if cfg.address:
        # A joined cluster's dashboard and bindings are configured by its own ``ray start``.
        ray.init(address=cfg.address, log_to_driver=False)
    else:
        store = None if cfg.object_store_memory_mb is None else cfg.object_store_memory_mb * 2**20
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard, dashboard_host=cfg.dashboard_host,
                 object_store_memory=store, _node_ip_address="127.0.0.1", log_to_driver=False)
    log.info("ray: %s", cfg.address or "embedded on 127.0.0.1")
    return True
