"""Run the improvement service: ``python -m services.improvement``."""

from services.improvement.service import main
from streams.runtime import service_main

service_main("improvement", main)
