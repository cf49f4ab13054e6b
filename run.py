"""Start the chat server (the same as `python -m server`)."""

from server.__main__ import main

if __name__ == "__main__":
    main()
