"""convstate: a conversation-state service with a prefix metadata store."""

__version__ = "0.1.0"
