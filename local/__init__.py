"""Local tooling beside the platform: the single-node Kafka broker launcher, the fake
OpenAI-compatible LLM server and the simulated worlds. Tests, benchmarks and
`orchestrator up` use it; no service and nothing under ``streams/`` imports it."""
