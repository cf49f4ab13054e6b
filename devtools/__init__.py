"""Tools for developing and measuring the server, shared by tests/ and bench/ (never imported by server/)."""
