"""A split pipeline's peer side: node, gRPC server and client, frames, claims, prepare, file service."""
