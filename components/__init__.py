"""One module (or small package) per pipeline stage."""
