"""The HTTP edge: REST routes, pages, the OpenAPI document, middleware and per-client limits."""
