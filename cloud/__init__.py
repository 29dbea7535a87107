"""edgeloop's cloud side: training, registry, publishing, fleet review, retraining."""
