"""Stage 0's server: bring-up, engine, OpenAI frontend, draft API, config, dashboard."""
