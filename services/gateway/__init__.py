"""The OpenAI-compatible HTTP gateway: apps that speak OpenAI's API use the platform unchanged."""
