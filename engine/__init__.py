"""Asyncio windowed inpainting engine: sources -> windows -> two TCCP stages -> sinks."""
