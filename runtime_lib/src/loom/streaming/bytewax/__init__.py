"""The Bytewax execution layer: compiled plans become Bytewax dataflows."""
