"""tccp/models."""
