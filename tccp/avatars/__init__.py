"""Avatar packs: a person's fine-tuned model plus their reference images.

`store` (the folder format, lookup, listing), `create` (`tccp avatar create`: split,
prepare, fine-tune, pack), `refs` (choosing and serving reference images) and
`evaluate` (fine-tuned vs base pack on held-out footage).
"""
