"""The app factory for several gateway processes: ``uvicorn gateway.factory:app_from_env --factory``.

Each uvicorn worker process builds its own app from ``MGPU_*`` environment variables (``mgpu gateway
--gateway-procs N`` exports them) and its own ``gateway_id``, hence its own reply stream.
"""

from __future__ import annotations

from common.logs import setup_logging
from common.settings import GatewaySettings
from gateway.app import GenerationFastPath, create_asgi
from gateway.server import configure


def app_from_env() -> GenerationFastPath:
    s = GatewaySettings.load()
    setup_logging(s.log_level, s.log_json, name="[gateway] ")
    configure(s.http_read_timeout_s, s.max_connections, s.retry_after_s)
    return create_asgi(s)
