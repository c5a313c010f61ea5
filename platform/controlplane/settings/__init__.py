"""Settings, split by concern and read from the environment.

Pick a module with DJANGO_SETTINGS_MODULE: `local` (default for `make run`,
embedded defaults), `test`, or `production` (every required variable must be
set, and `manage.py check --deploy` is clean).
"""
