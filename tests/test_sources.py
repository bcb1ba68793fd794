"""Listing sources: errors that say what was wrong."""

import pytest

from components.core.errors import ConfigError
from components.preprocess.sources import discover


def test_missing_manifest_and_empty_folder_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="manifest not found: .*absent.csv"):
        discover(str(tmp_path / "absent.csv"))
    with pytest.raises(ConfigError, match="no files under"):
        discover(str(tmp_path))
