"""Stage 0's server: engine, OpenAI frontend, speculation settings, draft API, config, dashboard."""
