"""Shared test helpers: people, clients and the cross-tenant registry."""
