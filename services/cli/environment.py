"""Where the per-service environment table was; it lives in :mod:`local.environment` now.

Kept for bench/chaos.py, which still starts its services itself and imports it from here.
"""

from local.environment import COMMON, GRANTS, SERVICE_GRANTS, Vars, grants_of, service_env

__all__ = ["COMMON", "GRANTS", "SERVICE_GRANTS", "Vars", "grants_of", "service_env"]
