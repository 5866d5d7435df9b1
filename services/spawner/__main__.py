"""Run the spawner: ``python -m services.spawner``."""

from services.spawner.service import main
from streams.runtime import service_main

service_main("spawner", main)
