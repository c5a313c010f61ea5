#!/usr/bin/env python
"""Django's command-line utility for the Atelier control plane."""

import os
import sys


def main() -> None:
    # Production unless told otherwise: it refuses to start without its required variables,
    # where a local default would quietly run with DEBUG and a development secret.
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings.production")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
