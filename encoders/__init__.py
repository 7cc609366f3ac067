"""Encoders stage (``vstream.encoders``): vision towers, speech recognition and text
embeddings that turn frames and audio into features."""
