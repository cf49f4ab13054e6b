"""People taking over: the agents' queue and claims, tickets, timers, summaries and who is an agent."""
