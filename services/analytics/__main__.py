"""`python -m services.analytics`: run the analytics sink service."""

from services.analytics.sink import main
from streams.runtime import service_main

if __name__ == "__main__":
    service_main("analytics", main)
