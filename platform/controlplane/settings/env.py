"""The one environment reader. `FOO_FILE` may hold a path whose content is FOO."""

from pathlib import Path

import environ

from jobcontracts.broker import data_dir

env = environ.FileAwareEnv()

#: platform/ (the source root that holds manage.py)
SOURCE_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = data_dir()
