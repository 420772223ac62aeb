"""How many sessions a stage keeps KV caches for unless told: one default for every room.

Stage 0's `--max-sessions`, the coordinator's `KvCacheConfig`, a peer's `Load` without one
and a `SessionStore` all start from it. It lives alone, without mlx, so that the CLI can
show it as an option's default without loading the runtime.
"""

DEFAULT_MAX_SESSIONS = 16  # KV caches (one per session) a stage holds at once
