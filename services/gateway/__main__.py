"""Run the gateway: ``python -m services.gateway``."""

from services.gateway.service import main
from streams.runtime import service_main

service_main("gateway", main)
