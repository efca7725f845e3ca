"""Qt-free core of glas-seg: models, data, training, inference, post-processing, metrics."""
