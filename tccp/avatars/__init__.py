"""Avatars: a person's reference bank plus a model pack (the base pack, or its stage 1
with a stage 2 fine-tuned on the person).

`store` (the folder format, lookup, listing), `create` (`tccp avatar create`: split,
reference bank, optional stage-2 fine-tuning, validation, pack) and `evaluate` (base
pack vs avatar on held-out footage).
"""
