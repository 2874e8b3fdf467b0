"""Reference backend: a deterministic stand-in for a vLLM server that implements the convstate
prompt_cache extension (see docs/backend-protocol.md). Entry points: `config.ReferenceSettings`,
`server.create_app`, and `testing.serve` for tests."""
