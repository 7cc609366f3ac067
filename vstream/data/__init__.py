"""Training data in the formats people have (readers stream: no file is read whole), and
the features extracted from it once (``features``)."""

from vstream.data.conversations import ConversationRecord, Turn, read_conversations, read_json_records
from vstream.data.features import (
    AbstractInputs,
    DocumentFeatures,
    RecordFeatures,
    extracted,
    feature_path,
    read_document_features,
    read_features,
    write_document_features,
    write_features,
)
from vstream.data.interleaved import Entry, InterleavedDocument, read_interleaved
from vstream.data.mminstruct import InstructRecord, question_type, read_mminstruct

__all__ = ["AbstractInputs", "ConversationRecord", "DocumentFeatures", "Entry", "InstructRecord", "InterleavedDocument",
           "RecordFeatures", "Turn", "extracted", "feature_path", "question_type", "read_conversations",
           "read_document_features", "read_features", "read_interleaved", "read_json_records", "read_mminstruct",
           "write_document_features", "write_features"]
