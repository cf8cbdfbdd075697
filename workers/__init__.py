"""What runs inside Ray actors: models, preprocessing, batched prediction."""
