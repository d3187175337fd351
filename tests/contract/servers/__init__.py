"""Real servers and stand-ins for the backend contract suite: one module per remote backend type, each with a ``Server`` class."""
