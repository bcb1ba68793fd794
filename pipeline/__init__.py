"""The top layer: the ``finetune`` command line, the one orchestrator and its executors
(in-process and Kubernetes Jobs), and the cluster code. Imports ``components``; never the
reverse. Importing it changes nothing: process-wide TensorFlow options are set per command
by ``pipeline.cli``."""
