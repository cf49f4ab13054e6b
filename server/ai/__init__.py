"""Answers from models: the provider chain with its breakers and watchdog, the providers, the knowledge base."""
