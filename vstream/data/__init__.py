"""Training data in the formats people have (readers stream: no file is read whole)."""

from vstream.data.conversations import ConversationRecord, Turn, read_conversations, read_json_records

__all__ = ["ConversationRecord", "Turn", "read_conversations", "read_json_records"]
