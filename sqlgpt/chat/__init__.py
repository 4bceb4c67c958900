"""Chat: templates that turn a conversation into a model's text, the
conversations' ids with the assistant's tokens marked, and the data a chat
fine-tune reads."""
