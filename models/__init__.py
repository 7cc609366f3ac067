"""Models stage (``vstream.models``): projector, language-model adapters, prompt
building and pluggable heads."""
