"""One module (or small package) per pipeline stage."""

import pipeline  # noqa: F401  (sets TensorFlow's CPU options before TensorFlow is imported)
