"""Wiring of the stages: command line, configuration and the storage edge."""
