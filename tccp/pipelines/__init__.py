"""Inference pipelines, one per stage (models apart from samplers apart from pipelines):
`landmarks` (stage 1: audio + pose prior -> landmark motion), `faces` (stage 2: the
region edit); `tccp.pipeline` puts them together."""
