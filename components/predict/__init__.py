"""Batch prediction (``finetune predict``): a registry model over a folder or bucket of images.

``model.py`` resolves the model reference once, in the driver; ``pipeline.py`` is the Beam
graph (read and check the images, Beam's ``RunInference`` with the SavedModel's own
``serving_default``, write the predictions); ``stage.py`` is the adapter that lists the
inputs, runs the graph into a staging folder and publishes it whole.
"""
