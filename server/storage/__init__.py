"""The only code that knows Redis: stores by aggregate, key names, Lua scripts and the write-behind buffer."""
