"""Contracts shared by the control plane and the GPU workers.

Standard library only: both sides import this package, and a GPU host must be
able to install it without Django. Messages cross the broker as JSON, addressed
by task *name*, so neither side imports the other's code.
"""
