"""Memory stage (``vstream.memory``): the STAR memory, the feature bank and the
transcript index. Filled in by the memory issue; the package exists so the install
layout (``vstream.memory`` from ``memory/``) is fixed from the start."""
