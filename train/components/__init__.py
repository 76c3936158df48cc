"""Pieces that several recipes share (targets, encoders, seeding, precision); recipes import
these, never each other."""
