"""Local tooling beside the platform: the single-node Kafka broker launcher, the fake
OpenAI-compatible LLM server, the simulated worlds and the launcher that runs the services
as processes. Tests, benchmarks and `orchestrator up` use it; no service and nothing under
``streams/`` imports it, and it imports no service."""
