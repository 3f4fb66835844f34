"""Character-level restoration transformer for damaged texts: model, data, train, predict, evaluate,
TransformerLens conversion, and SAEs on its residual stream (see DESIGN.md)."""
