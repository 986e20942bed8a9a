"""The one Ray bootstrap every stage uses: join a cluster (``address``) or start an embedded one on 127.0.0.1.

Ingest, precompute, recaption and evaluation all call ``ensure_ray``; none calls ``ray.init`` itself, so
the loopback binding, token authentication, the dashboard default and the object-store cap are decided here.

An embedded runtime is a single-node Ray that nobody else needs to reach, so it listens on loopback only and
keeps Ray's token authentication on. Ray itself rewrites ``_node_ip_address="127.0.0.1"`` to the machine's
routable address (``services.resolve_ip_for_localhost``), and its GCS, raylet, core workers and agents then
bind that address or every interface; only Ray's single-node mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
the mode it uses on laptops) keeps every server on loopback. A cluster joined with ``address`` is configured
by its own ``ray start`` and is left as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Iterator

log = logging.getLogger("tessera.ray")

LOOPBACK = "127.0.0.1"
_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_AUTH_MODE_ENV = "RAY_AUTH_MODE"


@dataclass(kw_only=True)
class RayConfig:
    """How to reach Ray: start an embedded runtime (``address: null``) or join ``address``."""

    address: str | None = None  # None: embedded runtime on this machine; "auto" or ray://...: join a cluster
    num_cpus: int | None = None  # embedded runtime only; None -> all cores
    include_dashboard: bool = False
    dashboard_host: str = LOOPBACK  # never 0.0.0.0 unless a config says so
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
        # A joined cluster's dashboard, bindings and authentication are configured by its own ``ray start``.
        ray.init(address=cfg.address, log_to_driver=False)
        log.info("ray: joined %s", cfg.address)
        return True
    store = None if cfg.object_store_memory_mb is None else cfg.object_store_memory_mb * 2**20
    _require_token_auth()
    with _single_node_mode():
        # address="local": never attach to a cluster some other ``ray start`` on this machine recorded.
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard,
                 dashboard_host=cfg.dashboard_host, object_store_memory=store, _node_ip_address=LOOPBACK,
                 log_to_driver=False)
    log.info("ray: embedded on %s (token authentication on)", LOOPBACK)
    return True


def _require_token_auth() -> None:
    """Token authentication for the embedded runtime, even when the environment says ``RAY_AUTH_MODE=disabled``."""
    mode = os.environ.get(_AUTH_MODE_ENV)
    if mode is None:
        return  # Ray's own default for a new local runtime is token mode (it creates ~/.ray/auth_token)
    if mode.lower() != "token":
        log.warning("ray: %s=%s ignored: the embedded runtime keeps token authentication on", _AUTH_MODE_ENV, mode)
    # Ray reads the mode into its C++ config at import; this is the call Ray itself makes to switch it on. It is
    # private (Ray >= 2.52, pyproject's floor), so a Ray that moved it is a clear error, not an ImportError.
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError as e:
        import ray

        raise RuntimeError(f"ray {ray.__version__} has no _enable_token_auth (Tessera needs Ray >= 2.52, tested on "
                           f"2.60); unset {_AUTH_MODE_ENV} or set it to 'token' before starting") from e
    _enable_token_auth()


@contextlib.contextmanager
def _single_node_mode() -> Iterator[None]:
    """Ray's single-node mode for the duration of ``ray.init``: every server binds loopback.

    The environment variable reaches the processes ``ray.init`` spawns; the module constant is the copy this
    process read at ``import ray``. Both are restored afterwards, so a later join of a real cluster from the
    same process is unaffected.
    """
    from ray._private import ray_constants

    old_env, old_const = os.environ.get(_SINGLE_NODE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_NODE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_const
        if old_env is None:
            os.environ.pop(_SINGLE_NODE_ENV, None)
        else:
            os.environ[_SINGLE_NODE_ENV] = old_env
