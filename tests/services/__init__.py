"""Throwaway local services for tests: a password-authenticating PostgreSQL cluster and moto."""
