"""Stateless GPU executors. Never imports Django, the control plane or Stripe."""
