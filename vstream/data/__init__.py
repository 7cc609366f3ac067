"""Training data in the formats people have (readers stream: no file is read whole), and
the features extracted from it once (``features``)."""

from vstream.data.conversations import ConversationRecord, Turn, read_conversations, read_json_records
from vstream.data.features import RecordFeatures, extracted, feature_path, read_features, write_features

__all__ = ["ConversationRecord", "RecordFeatures", "Turn", "extracted", "feature_path", "read_conversations",
           "read_features", "read_json_records", "write_features"]
