"""Run the router: ``python -m services.router``."""

from services.router.service import main
from streams.runtime import service_main

service_main("router", main)
