"""The Socket.IO edge: the server, its managers, the customer and agent namespaces, and the one emitter."""
