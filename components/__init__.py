"""One package per pipeline stage, and beneath them `core`: what the stages share.

Nothing here imports `pipeline` (the command line, the orchestrator and the cluster code):
dependencies run pipeline -> components -> components.core (`make lint` checks it).
"""
