"""Settings, split by concern and read from the environment.

Pick a module with DJANGO_SETTINGS_MODULE: `local` (what `make run` sets,
DEBUG, on its private PostgreSQL and Redis), `test`, or `production` (the default when none is set:
every required variable must be set, and `manage.py check --deploy` is clean).
"""
