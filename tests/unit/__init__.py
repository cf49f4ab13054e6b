"""Unit tests: pieces with logic of their own, no Redis, no server, no network; each runs in milliseconds."""
