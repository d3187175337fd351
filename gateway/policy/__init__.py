"""Policies: the rule language (:mod:`.rules`, pure: no I/O), and their storage and
compiled, swap-on-change set (:mod:`.store`).

May import: store (for the stored documents), errors. Nothing above.
"""
