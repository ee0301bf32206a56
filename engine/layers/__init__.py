"""Building blocks of the model: linear layers, attention, rotary embeddings, norms."""
