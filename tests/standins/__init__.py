"""Stand-ins for vendor services that cannot run on this machine (tests only)."""
