"""Layer-range execution with mlx: the compute of every stage."""
