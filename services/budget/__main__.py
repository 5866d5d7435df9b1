"""Run the budget service: ``python -m services.budget``."""

from services.budget.service import main
from streams.runtime import service_main

service_main("budget", main)
