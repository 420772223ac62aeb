"""Layer-range execution with mlx, in rooms: model, decode, stage, serve, bench."""
