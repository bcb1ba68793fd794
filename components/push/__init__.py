"""Push: a blessed export published as a new version of the serving registry."""
