"""One file per provider behind the small async interface in `base.py`."""
