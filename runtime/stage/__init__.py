"""A split pipeline's stages: node, gRPC server and client, frames, claims, prepare, coordinator."""
