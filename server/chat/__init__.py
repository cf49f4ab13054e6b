"""A visitor's turn: ordering, the prompt, the provider call, streaming, storing and escalation rules."""
