"""What every stage shares, beneath the stages: errors, the storage edge, the run-directory
layout, scratch space and provenance stamps. Imports neither TensorFlow nor Beam."""
