"""Tests of each backend type's own features (auth methods, vendor specifics), beyond the contract suite."""
