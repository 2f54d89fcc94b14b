"""Retrieval service: tenant-isolated chunking, embedding and vector search over Qdrant."""
