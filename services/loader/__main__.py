"""Run the loader: ``python -m services.loader``."""

from services.loader.service import main
from streams.runtime import service_main

service_main("loader", main)
