"""The prediction service: serves the models the pipeline publishes into ``MODELS_DIR``.

``serving.app:create_app`` builds the ASGI application
(``uvicorn --factory serving.app:create_app --port 8989``);
``serving.client`` is a small ``requests`` client for it. Nothing here imports the pipeline's
``penguins`` package: the published files are the only thing the two halves share.
"""
