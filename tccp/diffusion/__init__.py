"""tccp/diffusion."""
