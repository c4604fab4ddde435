"""Building blocks shared by every model family: norms, rotary embeddings, MLP, attention, sampling."""
